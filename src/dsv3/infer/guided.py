"""Structured output (guided decoding) with llguidance.

A request's `SamplingParams.guided_decoding` (JSON schema, any JSON object, regex or a choice of
strings) becomes an llguidance grammar. Each sequence owns a matcher (the grammar's parser state);
before every sampling step the matcher gives the set of tokens that keep the output inside the
grammar (a bitmask over the vocabulary), the engine puts -inf on every other logit, and the sampled
token advances the matcher. EOS is allowed only where the grammar may end; once the grammar cannot
continue, the sequence stops.

Why llguidance (of xgrammar, llguidance, outlines-core; all have CPU wheels for Python 3.11):
it has no dependencies (xgrammar pulls in triton and transformers), it computes each token mask
lazily from the current parser state in well under a millisecond even for the 129,280-token V3
vocabulary (outlines-core builds an index over the whole vocabulary per schema, which is slow for
large vocabularies and cannot express arbitrary JSON objects, a recursive grammar), it covers the
JSON-schema keywords OpenAI structured output uses, and vLLM ships it as its `guidance` backend.

JSON is generated compact (no free whitespace), as vLLM's `disable_any_whitespace`: a model,
random-weight or not, cannot wander into endless indentation. A schema may override that with
llguidance's `"x-guidance": {"whitespace_flexible": true}`.

Failures belong to one sequence. Sizes are capped before anything is compiled; llguidance runs under
`LLParserLimits` with terse errors (no grammar text or parser state in a message); a grammar that hits
a limit while decoding (a lexer blow-up, a token the matcher refuses) ends only its own sequence with
finish_reason "error" and one line (`GuidanceError`), and its compiled template leaves the cache
(copies share the template's lexer, so a template that failed once would fail every later copy).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import torch

from dsv3.infer import json_budget

INSTALL_HINT = "guided decoding (structured output) needs the llguidance package: pip install dsv3[serve]"
JSON_DEFAULTS = {"whitespace_flexible": False}
_CACHE_SIZE = 128
# Caps before compiling (the server may set lower ones): llguidance panics on a grammar of more than
# ~65k symbols (a 100,000-string choice) and spends seconds on megabytes of schema.
MAX_GRAMMAR_CHARS = 256 << 10  # schema JSON text / regex / all choices together
MAX_CHOICES = 10_000
_MSG_CHARS = 200


class GuidanceError(RuntimeError):
    """The grammar failed while decoding one sequence (a limit hit, a token it refuses): one line."""


def _one_line(message: str) -> str:
    """llguidance's message cut to its first line; a Rust panic's text is not for clients."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "invalid grammar"
    if "panic" in first.lower():
        return "the grammar is too large or too complex for the decoder"
    return first if len(first) <= _MSG_CHARS else first[: _MSG_CHARS - 3] + "..."


@lru_cache(maxsize=1)
def _limits():
    """Parser limits: llguidance's defaults, with errors that carry no grammar or parser state."""
    return _llguidance().LLParserLimits(verbose_errors=False)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return llguidance


def grammar_key(g: Any) -> tuple[str, str]:
    """(kind, canonical text) of a `GuidedDecodingParams`; exactly one kind must be set."""
    kinds = [k for k in ("json", "regex", "choice") if getattr(g, k) is not None] + (["json_object"] if g.json_object else [])
    if len(kinds) != 1:
        raise ValueError(f"guided_decoding needs exactly one of json, regex, choice, json_object; got {kinds or 'none'}")
    kind = kinds[0]
    if kind == "json":
        schema = g.json
        if isinstance(schema, str):
            _cap(len(schema), "json")
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"guided_decoding.json is not valid JSON: {e}") from None
            except RecursionError:
                raise ValueError("guided_decoding.json nests too deeply to be a schema") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"guided_decoding.json must be a JSON schema (an object), got {type(schema).__name__}")
        try:
            text = json.dumps(schema)  # property order is kept: it is the order generated
        except RecursionError:
            raise ValueError("guided_decoding.json nests too deeply to be a schema") from None
        _cap(len(text), "json")
        return kind, text
    if kind == "regex":
        if not isinstance(g.regex, str):
            raise ValueError(f"guided_decoding.regex must be a string, got {type(g.regex).__name__}")
        _cap(len(g.regex), "regex")
        return kind, g.regex
    if kind == "choice":
        if not isinstance(g.choice, list) or not g.choice or not all(isinstance(c, str) for c in g.choice):
            raise ValueError("guided_decoding.choice must be a non-empty list of strings")
        if len(g.choice) > MAX_CHOICES:
            raise ValueError(f"guided_decoding.choice has {len(g.choice)} strings; at most {MAX_CHOICES} are allowed")
        _cap(sum(map(len, g.choice)), "choice")
        return kind, json.dumps(g.choice)
    return kind, ""


def _cap(n_chars: int, kind: str) -> None:
    if n_chars > MAX_GRAMMAR_CHARS:
        raise ValueError(f"guided_decoding.{kind} has {n_chars} characters; at most {MAX_GRAMMAR_CHARS} are allowed")


@lru_cache(maxsize=_CACHE_SIZE)
def grammar_text(kind: str, text: str) -> str:
    """The llguidance grammar for (kind, text), checked; ValueError with llguidance's message if invalid."""
    llg = _llguidance()
    M = llg.LLMatcher
    try:
        if kind == "json":
            grammar = M.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
        elif kind == "json_object":
            grammar = M.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)
        elif kind == "regex":
            grammar = M.grammar_from_regex(text)
        else:
            # one terminal (lexed by a DFA): as alternatives of a rule, more than 2000 strings overflow
            # the parser's row limit when the first token is consumed
            grammar = M.grammar_from_lark("start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in json.loads(text)))
    except BaseException as e:  # plain exceptions for malformed input; pyo3's PanicException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"guided_decoding.{kind}: {_one_line(str(e))}") from None
    is_error, messages = M.validate_grammar_with_warnings(grammar, limits=_limits())
    if is_error:
        raise ValueError(f"guided_decoding.{kind}: {_one_line(messages[0] if messages else '')}")
    return grammar


def validate(g: Any) -> None:
    """Raise ValueError (or the install hint) for a GuidedDecodingParams that cannot be compiled."""
    grammar_text(*grammar_key(g))


def tokenizer_json(tokenizer: Any) -> str:
    """tokenizer.json text of the dsv3 tokenizer or of a transformers fast tokenizer."""
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    raise ValueError("guided decoding needs a tokenizer backed by a tokenizer.json (the dsv3 or a fast HF tokenizer)")


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable stand-in character of each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: list[int]):
    """llguidance's view of the tokenizer, with each token's exact bytes. Built from the token list
    rather than from tokenizer.json, because llguidance's tokenizer.json loader marks EVERY added
    token special, and V3's non-special added tokens (`<think>`, `</think>`, the tool-call markers
    `<｜tool▁calls▁begin｜>` ...) are ordinary text the model writes: as special tokens the mask
    offered them for a grammar's literal "<think>" and then rejected them when sampled."""
    llg = _llguidance()
    from llguidance._tokenizer import TokenizerWrapper

    tokenizer_json(tokenizer)  # the same support check (dsv3 or HF fast tokenizer)
    backend = tokenizer.backend if hasattr(tokenizer, "to_str") else tokenizer.backend_tokenizer
    to_byte = _byte_decoder()
    tokens = [b""] * vocab_size
    for text, i in backend.get_vocab(with_added_tokens=False).items():
        if i < vocab_size:
            tokens[i] = bytes(to_byte[c] for c in text) if all(c in to_byte for c in text) else text.encode()
    special = []
    for i, added in backend.get_added_tokens_decoder().items():
        if i < vocab_size:
            tokens[i] = added.content.encode()
            if added.special:
                special.append(i)

    class _Tok:
        eos_token_id, bos_token_id, special_token_ids = eos_ids[0], None, special

        def __call__(self, s):
            return backend.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s,
                                  add_special_tokens=False).ids

    _Tok.tokens = tokens
    return llg.LLTokenizer(TokenizerWrapper(_Tok()), n_vocab=vocab_size, eos_token=eos_ids)


class GrammarCompiler:
    """Per engine: the llguidance view of the tokenizer (built on first use, ~1-3 s for V3) and an LRU
    of compiled matchers by grammar key; each sequence gets its own copy of the compiled matcher."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]):
        if tokenizer is None:
            raise ValueError("guided decoding needs a tokenizer (this engine has none)")
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._lltok = None
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()  # add_request may run in several threads

    def prepare(self) -> None:
        """Build the llguidance view of the tokenizer now (it holds the GIL for 1-2 s on V3's vocabulary;
        a server does it before serving rather than inside the first guided request)."""
        with self._lock:
            self._view()

    def _view(self):  # under self._lock
        if self._lltok is None:
            self._lltok = ll_tokenizer(self._tokenizer, self.vocab_size, self.eos_ids)
        return self._lltok

    def matcher(self, g: Any, budget: int | None = None):
        """A fresh matcher of `g`; with `budget` (the tokens the sequence may still write) a JSON
        grammar is narrowed so that every output closes within it (`json_budget.bound_schema`)."""
        key = _budgeted_key(g, budget)
        with self._lock:
            lltok, template = self._view(), self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
        # compiled outside the lock: a slow grammar (seconds) does not hold up other requests' cache hits
        template = _llguidance().LLMatcher(lltok, grammar_text(*key), log_level=0, limits=_limits())
        if template.is_error():
            raise ValueError(f"guided_decoding.{key[0]}: {_one_line(template.get_error())}")
        with self._lock:
            self._compiled[key] = template
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
            return template.deep_copy()

    def forget(self, g: Any, budget: int | None = None) -> None:
        """Drop a grammar whose matcher failed while decoding: the next request compiles it afresh."""
        with self._lock:
            self._compiled.pop(_budgeted_key(g, budget), None)


def _budgeted_key(g: Any, budget: int | None) -> tuple[str, str]:
    """The grammar key, a JSON schema (or json_object) narrowed to close within `budget` tokens,
    rounded down to 2**k or 1.5 * 2**k so that many budgets share each compiled grammar."""
    kind, text = grammar_key(g)
    if budget is None or budget < 1 or kind not in ("json", "json_object"):
        return kind, text
    q = 1 << (budget.bit_length() - 1)
    q += q // 2 if budget >= q + q // 2 else 0
    return "json", _bounded_text(text if kind == "json" else '{"type": "object"}', q)


@lru_cache(maxsize=_CACHE_SIZE)
def _bounded_text(text: str, budget: int) -> str:
    try:
        return json.dumps(json_budget.bound_schema(json.loads(text), budget))
    except json_budget.Unbounded:  # documented: such a schema may still end at max_tokens ("length")
        return text


_BITS = torch.tensor([[(byte >> b) & 1 for b in range(8)] for byte in range(256)], dtype=torch.bool)  # byte -> its 8 bits


def allowed_tokens(matchers: list[Any], vocab_size: int) -> tuple[torch.Tensor, dict[int, str]]:
    """The tokens each grammar allows next, as a CPU bool [len(matchers), vocab_size], and {row: error}
    of the matchers that failed (their rows allow every token: the engine ends those sequences).
    llguidance writes a bitmask (bit j of int32 word w = token 32w + j); its little-endian bytes index a bit table."""
    words = (vocab_size + 31) // 32
    bits = torch.zeros(len(matchers), words, dtype=torch.int32)
    failed: dict[int, str] = {}
    for i, (row, m) in enumerate(zip(bits, matchers)):
        try:
            m.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
            error = m.get_error() if m.is_error() else None
        except BaseException as e:  # a panic inside llguidance (pyo3's PanicException is a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            error = str(e)
        if error is not None:
            failed[i] = f"guided decoding failed: {_one_line(error)}"
            row.fill_(-1)
    return _BITS[bits.view(torch.uint8).long()].view(len(matchers), -1)[:, :vocab_size], failed


def advance(matcher: Any, token: int) -> bool:
    """Feed the sampled token; True when the grammar is complete and cannot continue (stop now).
    GuidanceError (one line, nothing of the grammar) when the matcher refuses it or fails."""
    try:
        ok = matcher.consume_token(token)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        ok = False
    if not ok:
        raise GuidanceError(f"guided decoding failed at token {token}: {_one_line(matcher.get_error())}")
    return matcher.is_stopped()


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list[Any],
              forbid: list[list[int]]) -> tuple[torch.Tensor, dict[int, str]]:
    """-inf on every logit the row's grammar forbids; `forbid[i]` (the stop ids under min_tokens) is
    also masked unless that would leave the row no token (then the grammar wins: it must end).
    -> (logits, {index into `rows`: error} of the grammars that failed)."""
    allowed, failed = allowed_tokens(matchers, logits.shape[-1])
    for ok, ban in zip(allowed, forbid):
        if ban:
            keep = ok.clone()
            keep[ban] = False
            if keep.any():
                ok.copy_(keep)
    mask = allowed.to(logits.device, non_blocking=True)
    out = logits.clone()
    idx = torch.tensor(rows, device=logits.device)
    out[idx] = out[idx].masked_fill(~mask, float("-inf"))
    return out, failed

