"""Training speed per precision and memory format: the numbers behind the CPU defaults.

Times plain training steps of erde's early-exit models at one batch size, for
each setting (NCHW fp32, NHWC fp32, and NHWC bf16 where the CPU has bf16
hardware, or with --bf16 anyway), in interleaved rounds, fastest round kept:

  teacher step  ResNet-56, cross-entropy on every exit, forward + backward + SGD
  ERDE step     ResNet-20 student, ERDE loss, plus the ResNet-56 teacher's forward

and prints img/s and the ratio to NCHW fp32. Random images (speed does not
depend on pixel values), so it runs from a fresh clone with no data.

    python benchmarks/cpu_settings.py                 # batch 128, torch's threads
    python benchmarks/cpu_settings.py --threads 2 --json cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.cli import guarded  # noqa: E402
from erde.hardware import cpu_has_bf16, cpu_precision_summary  # noqa: E402
from erde.io import environment_info  # noqa: E402
from erde.losses import exit_mapping, student_loss, teacher_loss  # noqa: E402
from erde.models import build_model  # noqa: E402


def make_step(
    kind: str, nhwc: bool, bf16: bool, batch: int, teacher_arch: str, student_arch: str,
    compiled: bool = False,
):  # fmt: skip
    """A closure running one training step of ``kind`` (teacher | erde) in the given setting.

    ``compiled`` runs the model (and the teacher's forward) through ``torch.compile``, as
    ``*_train.compile=true`` does in training.
    """
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g)
    teacher = build_model(num_classes=10, arch=teacher_arch).to(memory_format=fmt)
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    if kind == "teacher":
        model = teacher.train()
    else:
        model = build_model(num_classes=10, arch=student_arch).to(memory_format=fmt).train()
        teacher.eval()
        mapping = exit_mapping(model.num_exits, teacher.num_exits)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    forward = torch.compile(model) if compiled else model
    teacher_forward = torch.compile(teacher) if compiled and kind != "teacher" else teacher

    def step() -> None:
        with cast():
            out = forward(x)
            if kind == "teacher":
                loss = teacher_loss(out, y, [1.0] * len(out))["total"]
            else:
                with torch.inference_mode():
                    t_out = teacher_forward(x)
                t_out = [z.clone() for z in t_out]
                loss = student_loss("erde", out, t_out, y, [1.0] * len(out), mapping)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (default 5)")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds, fastest kept (default 3)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--bf16", action="store_true", help="also time bf16 where it is emulated")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time NHWC fp32 under torch.compile (compiles first: minutes)",
    )
    p.add_argument(
        "--teacher-arch", default="resnet56", help="teacher backbone (default: resnet56)"
    )
    p.add_argument(
        "--student-arch", default="resnet20", help="student backbone (default: resnet20)"
    )
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [("NCHW fp32", False, False, False), ("NHWC fp32", True, False, False)]
    if cpu_has_bf16() or args.bf16:
        settings.append(("NHWC bf16", True, True, False))
    if args.compile:
        settings.append(("NHWC fp32 compiled", True, False, True))
    print(f"{cpu_precision_summary()}; {torch.get_num_threads()} threads; batch {args.batch_size}")
    results = {}
    for kind in ("teacher", "erde"):
        steps = {
            name: make_step(
                kind, nhwc, bf16, args.batch_size, args.teacher_arch, args.student_arch, compiled
            )  # fmt: skip
            for name, nhwc, bf16, compiled in settings
        }
        for fn in steps.values():  # warm-up
            fn()
        best = {name: 0.0 for name in steps}
        for _ in range(args.rounds):
            for name, fn in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                ips = args.steps * args.batch_size / (time.perf_counter() - start)
                best[name] = max(best[name], ips)
        base = best["NCHW fp32"]
        for name, ips in best.items():
            print(f"{kind:7s} step  {name:18s}  {ips:7.1f} img/s  ratio {ips / base:.2f}")
        results[kind] = best
    if args.json:
        args.json.write_text(json.dumps({"results": results, "batch_size": args.batch_size,
                                         "environment": environment_info()}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
