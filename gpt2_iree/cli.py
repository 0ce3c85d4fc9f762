"""`gpt2-iree`: generate, fine-tune, inspect and benchmark a compiled GPT-2.

Every command takes the build directory `doit` made (default: the one `doit`
builds with no vars) and `--device` (default: the best this host has).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import replace_atomically, write_json
from gpt2_iree.module import DEFAULT_BUILD_DIR


def _session(args, params: Path | None = None):
    from gpt2_iree.session import Session

    return Session(args.build_dir, args.device, params)


def _prompts(args) -> list[str]:
    """The prompts given, checked before any work: --prompt (repeatable), or
    one per line of --prompts-file. An empty prompt is unconditional text."""
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise Gpt2IreeError(f"--prompts-file {path}: {err.strerror or err}") from None
        if not lines:
            raise Gpt2IreeError(f"--prompts-file {path} is empty; give one prompt per line")
        return lines
    return args.prompt or []


def cmd_generate(args) -> None:
    from gpt2_iree.sampling import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    prompts = _prompts(args)
    if not prompts and not args.interactive:
        raise Gpt2IreeError("give --prompt TEXT (repeatable), --prompts-file FILE or --interactive")
    session = _session(args, args.params)
    for prompt in prompts:
        if (n := len(session.encode_prompt(prompt))) > session.context:
            print(f"gpt2-iree generate: note: a prompt is {n} tokens, longer than the context of "
                  f"{session.context}: the model sees its last {session.context // 2} (rebuild with "
                  f"`doit context=N` for more, up to the model's positions)", file=sys.stderr)
    options = {"max_new_tokens": args.max_new_tokens, "sampling": sampling, "stop": tuple(args.stop)}
    if args.interactive:
        _interactive(session, prompts, options)
    elif args.json or len(prompts) > 1:
        for completion in session.complete(prompts, **options):
            if args.json:
                print(json.dumps({"prompt": completion.prompt, "completion": completion.text,
                                  "tokens": completion.tokens, "stop_reason": completion.stop_reason,
                                  "device": session.module.device}), flush=True)
            else:
                print(completion.prompt + completion.text, flush=True)
    else:
        _stream(session.generate(prompts[0], **options), prompts[0])


def _stream(pieces, before: str = "") -> None:
    print(before, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print(flush=True)


def _interactive(session, prompts: list[str], options: dict) -> None:
    """Each line of standard input (after any --prompt) continues the same
    cache; `/reset` on a line of its own starts over; end of input ends."""
    lines = iter(prompts)
    resume = False
    while True:
        line = next(lines, None)
        if line is None:
            line = sys.stdin.readline()
            if not line:
                return
            line = line.rstrip("\n")
        if line.strip() == "/reset":
            session.reset()
            resume = False
            print("(reset)", flush=True)
            continue
        _stream(session.generate(line, resume=resume, **options))
        resume = True


def _read_texts(args) -> list[str]:
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise Gpt2IreeError(f"--text-file {path}: no such file")
        # One text per paragraph (blank-line separated), so a file of examples
        # trains on each on its own.
        return [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    return [args.text]


def _first_words(session, text: str) -> str:
    """A prompt for the before/after comparison: the text's first half, in tokens."""
    ids = session.tokenizer.encode(text)
    return session.tokenizer.decode(ids[: max(1, min(session.prompt_len, len(ids) // 2))])


def cmd_finetune(args) -> None:
    from tqdm import tqdm

    texts = _read_texts(args)
    session = _session(args, args.params)
    session.encode_texts(texts)  # refuse bad text before any work
    prompt = args.prompt or _first_words(session, texts[0])
    session.encode_prompt(prompt)
    before = "".join(session.generate(prompt, args.max_new_tokens))

    with tqdm(total=args.steps, desc="finetune", unit="step") as bar:
        def on_step(step, loss):
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()

        losses = session.finetune(texts, args.steps, args.lr, on_step)

    after = "".join(session.generate(prompt, args.max_new_tokens))
    print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    print(f"before: {prompt}{before}")
    print(f"after:  {prompt}{after}")
    if args.out:
        session.save_params(args.out)
        print(f"saved weights: {args.out} (use with --params)")
    if args.export_hf:
        session.export_hf(args.export_hf)
        print(f"saved Hugging Face model: {args.export_hf} (build it with `doit model={args.export_hf}`)")
    if args.plot:
        _plot_losses(losses, Path(args.plot))
        print(f"saved loss curve: {args.plot}")


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="loss", title="fine-tuning loss", yscale="log")
    ax.grid(True, alpha=0.3)
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def cmd_inspect(args) -> None:
    from gpt2_iree import inspection

    path = Path(args.file)
    if path.suffix == ".irpa":
        print(inspection.format_irpa(inspection.inspect_irpa(path)))
    else:
        print(inspection.format_vmfb(inspection.inspect_vmfb(path)))


def cmd_bench(args) -> None:
    from gpt2_iree import bench

    result = bench.run_benchmark(args.build_dir, args.device, repeats=args.repeats,
                                 log=lambda line: print(line, file=sys.stderr))
    print(bench.format_table(result))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        bench.plot(result, Path(args.plot))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR,
                        help=f"a build directory made by doit (default: {DEFAULT_BUILD_DIR})")
    common.add_argument("--device", help="local-task (CPU), metal, vulkan, cuda (default: the best available)")

    top = argparse.ArgumentParser(prog="gpt2-iree", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", parents=[common], help="complete prompts, printing tokens as they come")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable; empty: unconditional text)")
    prompts.add_argument("--prompts-file", help="a file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="... and the fewest whose probability reaches P (1: off)")
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    p.add_argument("--stop", action="append", default=[], help="end the completion before this text (repeatable)")
    p.add_argument("--interactive", action="store_true",
                   help="continue the same cache with each line of standard input; /reset starts over")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per prompt: prompt, completion, tokens, stop_reason, device")
    p.add_argument("--params", type=Path, help="a .irpa of weights (e.g. saved by finetune --out)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("finetune", parents=[common], help="fine-tune on text in the module, then compare")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one text to fine-tune on")
    source.add_argument("--text-file", help="a file of texts, one per blank-line-separated paragraph")
    p.add_argument("--steps", type=_positive_int, default=30)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--prompt", help="prompt for the before/after completions (default: the text's first half)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--params", type=Path, help="start from these weights (.irpa)")
    p.add_argument("--out", type=Path, help="save the fine-tuned weights as .irpa")
    p.add_argument("--export-hf", type=Path, help="save them as a Hugging Face GPT-2 directory")
    p.add_argument("--plot", type=Path, help="save the loss curve as PNG")
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("inspect", help="what a .vmfb or .irpa holds")
    p.add_argument("file")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("bench", parents=[common], help="IREE vs jax.jit on the same weights and shapes")
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument("--json", type=Path, help="write the numbers as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG chart")
    p.set_defaults(run=cmd_bench)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (Gpt2IreeError, ValueError) as err:
        print(f"gpt2-iree {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
