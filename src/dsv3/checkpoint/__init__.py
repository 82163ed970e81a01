"""HF-format checkpoints: one name table (`hf_map`), a lazy reader (`reader`), streaming `load` / `save`
(public entry points re-exported by `io`), FP8 (`fp8`), `dsv3 convert`.

`from_pretrained` / `save_pretrained` are imported on first use, so the `dsv3 convert` command line
(`convert_cli`) can parse its arguments without importing torch."""

__all__ = ["from_pretrained", "save_pretrained"]


def __getattr__(name: str):
    if name in __all__:
        from dsv3.checkpoint import io

        return getattr(io, name)
    raise AttributeError(f"module 'dsv3.checkpoint' has no attribute {name!r}")
