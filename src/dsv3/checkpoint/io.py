"""Read and write Hugging Face format checkpoints: the public entry points, kept at this path.

The code lives in `dsv3.checkpoint.reader` (`CheckpointReader`), `dsv3.checkpoint.load`
(`load_checkpoint_into`), `dsv3.checkpoint.save` (`save_pretrained`) and the model's own
`Transformer.from_pretrained` / `Transformer.check_checkpoint`, which build it on the meta device
and stream the files in (so `dsv3.checkpoint.load` never imports the model class).
"""

from dsv3.checkpoint.save import save_pretrained
from dsv3.model.transformer import Transformer

from_pretrained = Transformer.from_pretrained
check_checkpoint = Transformer.check_checkpoint

__all__ = ["check_checkpoint", "from_pretrained", "save_pretrained"]
