"""Training: one loop for the early-exit teacher and any set of students side by side.

Modules, in reading order:

- :mod:`erde.training.loop`: :func:`train`, :func:`train_students`, :func:`train_together`
  and the loop itself (the path of one batch is in its docstring);
- :mod:`erde.training.model_run`: one model being trained (step, epoch end, checkpoint);
- :mod:`erde.training.context`: what the models share (batches, teacher forward);
- :mod:`erde.training.jobs`: what is trained (teacher or student, model, loss);
- :mod:`erde.training.resume`: which checkpoint a run continues, what it refuses;
- :mod:`erde.training.optim`, :mod:`erde.training.precision`: optimiser, schedule,
  mixed precision, memory format;
- :mod:`erde.training.meters`, :mod:`erde.training.console`: what is measured and said.
"""

from erde.data import load_splits
from erde.errors import TrainingError
from erde.monitor import EpochCallback
from erde.training.context import epoch_indices
from erde.training.jobs import Job, build_job_model, needs_teacher
from erde.training.loop import train, train_students, train_together
from erde.training.meters import EpochSums, NonFiniteWatch, evaluate_accuracy
from erde.training.optim import build_optimizer, build_scheduler
from erde.training.precision import amp_dtype
from erde.training.resume import PERFORMANCE_ONLY, config_differences, teacher_sha256

__all__ = [
    "PERFORMANCE_ONLY",
    "EpochCallback",
    "EpochSums",
    "Job",
    "NonFiniteWatch",
    "TrainingError",
    "amp_dtype",
    "build_job_model",
    "build_optimizer",
    "build_scheduler",
    "config_differences",
    "epoch_indices",
    "evaluate_accuracy",
    "load_splits",
    "needs_teacher",
    "teacher_sha256",
    "train",
    "train_students",
    "train_together",
]
