"""`gpt2-iree`: generate, fine-tune, inspect and benchmark a compiled GPT-2.

Every command takes the build directory `doit` made (default: the one `doit`
builds with no vars) and `--device` (default: the best this host has).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import check_output_file, check_output_dir, replace_atomically, write_json
from gpt2_iree.finetuning import Interrupted
from gpt2_iree.module import DEFAULT_BUILD_DIR
from gpt2_iree.schedule import SCHEDULES


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
                                  "device": session.device}), flush=True)
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


def _first_words(session, corpus) -> str:
    """A prompt for the before/after comparison: the first document's first half, in tokens."""
    end = int(np.argmax(corpus.tokens == session.tokenizer.eot_id))  # every document ends in end-of-text
    document = corpus.tokens[:end].tolist()
    return session.tokenizer.decode(document[: max(1, min(session.prompt_len, len(document) // 2))])


def _check_finetune_outputs(args) -> None:
    """Every output path of `finetune`, before any work: none of the run's results is lost to a bad one."""
    from gpt2_iree import checkpoint, lora, models
    from gpt2_iree.module import read_manifest

    for option, path in (("--out", args.out), ("--plot", args.plot), ("--json", args.json)):
        if path:
            check_output_file(option, path)
    if args.out:
        manifest = read_manifest(args.build_dir)
        stored = [manifest[group] for group in ("base", "generate") if group in manifest]
        own = ("gpt2.irpa", *(entry["archive"] for entry in stored),
               *(entry["packed"]["archive"] for entry in stored if "packed" in entry))
        if args.out.resolve() in {(args.build_dir / name).resolve() for name in own}:
            raise Gpt2IreeError(f"--out {args.out} is the build's own archive, its input; give another file")
    for option, out_dir, files in (("--export-hf", args.export_hf, models.MODEL_FILES),
                                   ("--export-peft", args.export_peft, lora.PEFT_FILES)):
        if not out_dir:
            continue
        check_output_dir(option, out_dir)
        # An export writes these files: a directory holding others is someone else's.
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in files) if out_dir.is_dir() else []
        if others:
            raise Gpt2IreeError(f"{option} {out_dir} holds files an export does not write "
                                f"({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}); give an empty "
                                f"or new directory, or a previous export")
    if args.export_peft and not lora.from_manifest(read_manifest(args.build_dir)):
        raise Gpt2IreeError(f"--export-peft: {args.build_dir} fine-tunes every weight, so it has no adapters; "
                            f"build with `doit tuning=lora`, or use --export-hf")
    if args.checkpoint_dir:
        check_output_dir("--checkpoint-dir", args.checkpoint_dir)
        resumed_here = args.resume and args.resume.resolve() == args.checkpoint_dir.resolve()
        if checkpoint.holds_checkpoint(args.checkpoint_dir) and not resumed_here:
            raise Gpt2IreeError(f"--checkpoint-dir {args.checkpoint_dir} holds a checkpoint already; resume it "
                                f"with --resume {args.checkpoint_dir}, or give another directory")


def cmd_finetune(args) -> None:
    from tqdm import tqdm

    from gpt2_iree import checkpoint, corpus as corpora, finetuning
    from gpt2_iree.lora import from_manifest
    from gpt2_iree.module import read_manifest

    if args.resume and args.params:
        raise Gpt2IreeError("--resume and --params both give the starting weights; give one")
    args.checkpoint_dir = args.checkpoint_dir or args.resume  # a resumed run goes on saving where it was
    _check_finetune_outputs(args)
    files = corpora.text_files(args.text_file or [])
    resumed = checkpoint.load(args.resume, read_manifest(args.build_dir)) if args.resume else None
    session = _session(args, resumed.params if resumed else args.params)
    trained = session.module  # opened, and any fault in it found, before the corpus is read
    corpus = session.corpus(files, args.text or [])
    train, val = corpora.split(len(corpus), args.val_fraction, args.seed)
    steps_per_epoch = -(-len(train) // session.batch)
    plan = finetuning.Plan(steps=args.steps or args.epochs * steps_per_epoch, learning_rate=args.lr,
                           lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                           save_every=args.save_every, checkpoint_dir=args.checkpoint_dir, seed=args.seed)
    run = finetuning.Run(trained, corpus, train, val, plan)
    if resumed:
        run.resume(resumed)
    prompt = args.prompt or _first_words(session, corpus)
    session.encode_prompt(prompt)
    print(f"corpus: {len(corpus.tokens)} tokens -> {len(corpus)} windows of {session.seq_len + 1} tokens, "
          f"{len(train)} to train on ({steps_per_epoch} steps/epoch), {len(val)} for validation; "
          f"{plan.steps} steps" + (f", resuming after step {run.step}" if resumed else ""))

    def report_validation(loss: float | None, when: str, write=print) -> None:
        if loss is not None:
            write(f"validation {when}: loss {loss:.4f}, perplexity {finetuning.perplexity(loss):.2f}")

    before = "".join(session.generate(prompt, args.max_new_tokens))
    report_validation(run.validate(), f"at step {run.step}")
    with finetuning.stop_on_signals() as received, \
            tqdm(total=plan.steps, initial=run.step, desc="finetune", unit="step") as bar:
        def on_step(step, loss, val_loss):
            bar.set_postfix(loss=f"{loss:.4f}", **({"val": f"{val_loss:.4f}"} if val_loss is not None else {}))
            bar.update()
            if run.history.val_loss and run.history.val_loss[-1][0] == step and step < plan.steps:
                report_validation(val_loss, f"at step {step}", bar.write)

        finished = session.train(run, on_step, should_stop=lambda: received() is not None)
    if not finished:
        kept = (f"saved checkpoint {plan.checkpoint_dir}; go on with --resume {plan.checkpoint_dir}"
                if plan.checkpoint_dir else "nothing saved (--checkpoint-dir keeps a run across interruptions)")
        raise finetuning.Interrupted(f"interrupted by {signal.Signals(received()).name} after step {run.step} of "
                                     f"{plan.steps}; {kept}", received())

    # The weights first: nothing that runs after training may lose them.
    if args.out:
        session.save_params(args.out)
        what = "adapters" if from_manifest(session.module.manifest) else "weights"
        print(f"saved {what}: {args.out} (use with --params on this build)")
    if args.export_hf:
        session.export_hf(args.export_hf)
        print(f"saved Hugging Face model: {args.export_hf} (build it with `doit model={args.export_hf}`)")
    if args.export_peft:
        session.export_peft(args.export_peft)
        print(f"saved PEFT adapter: {args.export_peft} (load it with peft.PeftModel.from_pretrained)")
    if plan.checkpoint_dir:
        print(f"saved checkpoint: {plan.checkpoint_dir} (go on with --resume {plan.checkpoint_dir} and more steps)")
    losses = run.history.train_loss
    print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps "
          f"({run.history.tokens_per_s:.0f} training tokens/s)")
    report_validation(run.validate(), f"after step {run.step}")
    after = "".join(session.generate(prompt, args.max_new_tokens))
    print(f"before: {prompt}{before}")
    print(f"after:  {prompt}{after}")
    if args.json:
        write_json(args.json, run.history.report())
        print(f"saved losses: {args.json}")
    if args.plot:
        _plot_losses(run.history, Path(args.plot))
        print(f"saved loss curves: {args.plot}")


def _plot_losses(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(history.train_loss) + 1), history.train_loss, marker="o", markersize=3, label="train")
    if history.val_loss:
        steps, losses = zip(*history.val_loss)
        ax.plot(steps, losses, marker="s", markersize=4, label="validation")
    ax.set(xlabel="step", ylabel="loss", title="fine-tuning loss", yscale="log")
    ax.legend()
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
    from gpt2_iree import bench, peers

    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(option, path)
    if args.peers and not peers.available():
        raise Gpt2IreeError("--peers needs PyTorch, transformers and peft: pip install -e '.[peers]'")
    result = bench.run_benchmark(args.build_dir, args.device, repeats=args.repeats, with_peers=args.peers,
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


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; valid: 0 or more")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range; valid: 0 <= fraction < 1")
    return value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR,
                        help=f"a build directory made by doit (default: {DEFAULT_BUILD_DIR})")
    common.add_argument("--device", help="local-task (CPU), local-sync (CPU, one thread), metal, vulkan, cuda "
                                          "(default: the best available)")

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
    source.add_argument("--text", action="append", help="a text to fine-tune on; repeat for more (each is a document)")
    source.add_argument("--text-file", type=Path, action="append",
                        help="a text file, or a directory of .txt files; repeat for more (each file is a document)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, default=1, help="passes over the training windows (default 1)")
    length.add_argument("--steps", type=_positive_int, help="optimizer steps (instead of --epochs)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                   help="after the warm-up: constant, or a linear or cosine decay to 0 (default constant)")
    p.add_argument("--warmup-steps", type=_count, default=0, help="steps of linear warm-up (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the validation split and each epoch's order (default 0)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="windows held out for validation (default 0.1, at least one; 0: none)")
    p.add_argument("--eval-every", type=_positive_int, help="steps between validations (default: before and after)")
    p.add_argument("--checkpoint-dir", type=Path, help="save checkpoints here, and on SIGINT/SIGTERM")
    p.add_argument("--save-every", type=_positive_int, help="steps between checkpoints (default: at the end)")
    p.add_argument("--resume", type=Path, help="go on from the checkpoint in this directory")
    p.add_argument("--prompt", help="prompt for the before/after completions (default: the first document's first half)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--params", type=Path, help="start from these weights (.irpa)")
    p.add_argument("--out", type=Path, help="save the fine-tuned weights as .irpa")
    p.add_argument("--export-hf", type=Path, help="save them as a Hugging Face GPT-2 directory (LoRA: merged)")
    p.add_argument("--export-peft", type=Path, help="tuning=lora: save the adapters as a Hugging Face PEFT directory")
    p.add_argument("--plot", type=Path, help="save the loss curves as PNG")
    p.add_argument("--json", type=Path, help='save {"train_loss", "val_loss", "tokens_per_s"} as JSON')
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("inspect", help="what a .vmfb or .irpa holds")
    p.add_argument("file")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("bench", parents=[common], help="IREE vs jax.jit on the same weights and shapes")
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument("--peers", action="store_true",
                   help="also PyTorch's fine-tuning step on the same shape (PEFT's LoRA for a LoRA build)")
    p.add_argument("--json", type=Path, help="write the numbers as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG chart")
    p.set_defaults(run=cmd_bench)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except Interrupted as stop:
        print(f"gpt2-iree {args.command}: {stop}", file=sys.stderr)
        return 128 + stop.signal_number
    except KeyboardInterrupt:  # Ctrl-C outside a run's steps (loading, generating): nothing to keep
        print(f"gpt2-iree {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # the reader left (`| head`): as a shell tool ends, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush fails no more
        return 128 + signal.SIGPIPE
    except (Gpt2IreeError, ValueError, OSError) as err:  # OSError: a path, named in its message
        print(f"gpt2-iree {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
