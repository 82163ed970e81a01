"""Read and write Hugging Face format checkpoints: the public entry points, kept at this path.

The code lives in `dsv3.checkpoint.reader` (`CheckpointReader`), `dsv3.checkpoint.load`
(`from_pretrained`, `check_checkpoint`, `load_checkpoint_into`) and `dsv3.checkpoint.save`
(`save_pretrained`).
"""

from dsv3.checkpoint.load import check_checkpoint, from_pretrained
from dsv3.checkpoint.save import save_pretrained

__all__ = ["check_checkpoint", "from_pretrained", "save_pretrained"]
