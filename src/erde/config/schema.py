"""The configuration's shape: one typed dataclass per section of an experiment."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CROP_PADDING_MODES = ("zeros", "reflect")  # what fills a random translation's border


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | svhn | imagefolder
    data_dir: str | None = None  # folder holding the official files (not needed for digits)
    image_size: int | None = (
        None  # resize side in pixels; None = the data set's native size (digits: 16)
    )
    val_fraction: float = 0.1  # share of train held out for validation/calibration (never test)
    max_train: int | None = None  # keep at most this many training images (quick runs)
    split_seed: int | None = None  # seeds the validation split and max_train subset; None = seed
    batch_size: int = 128  # training batch size (per process)
    crop_padding: int | None = None  # random-translation padding in pixels; None = the data set's
    crop_padding_mode: str = "zeros"  # what fills the translation's border: zeros | reflect
    alternating_flip: bool = False  # mirror each image every other epoch instead of at random
    eval_batch_size: int = 512  # batch size for validation/test passes


@dataclass
class ModelConfig:
    arch: str = "resnet20"  # resnet<6n+2>, wrn<6n+4>_<k>, mobilenetv2[_x<m>], vgg<11|13|16|19>_bn, or package.module:factory
    width: float = 1.0  # channel width multiplier
    exit_after: list[int] | None = (
        None  # block counts after which early exits sit; None = evenly spaced
    )
    exit_at_macs: list[float] | None = (
        None  # instead of exit_after: fractions of the backbone's MACs, e.g. [0.15, 0.3, 0.5]
    )
    num_early_exits: int | None = (
        None  # with exit_after None: how many early exits (default 2 or 3 by depth)
    )
    head_pool: int = 2  # exit head: adaptive average pool to head_pool x head_pool
    head_dropout: float = 0.5  # exit head dropout probability
    head_hidden: int = 0  # exit head hidden FC width; 0 = a single FC layer as in the paper
    dropout: float = (
        0.0  # dropout inside WideResNet blocks; before the last layer of MobileNetV2/VGG
    )


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training set
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum (AdamW beta1)
    nesterov: bool = True  # Nesterov momentum for SGD
    weight_decay: float = 5e-4  # L2 weight decay (decoupled for AdamW)
    schedule: str = "cosine"  # cosine | linear | constant (per step, after warmup; to zero)
    warmup_epochs: float = 0.0  # linear warm-up length in epochs
    exit_weights: list[float] | None = None  # loss weight per exit; None = 1 for every exit
    label_smoothing: float = 0.0  # on the cross-entropy with labels (0 = off; not the KD targets)
    amp: bool | None = None  # bf16 autocast; None = on for CUDA and CPUs with bf16 hardware
    channels_last: bool = False  # NHWC memory format (faster convs on recent GPUs)
    compile: bool = False  # torch.compile the model
    whiten_init: bool = False  # set data-initialised layers (fastnet's stem) from training patches
    lookahead: bool = False  # pull the weights to their moving average every 5 steps (erde.recipe)
    norm_bias_lr_scale: float = 1.0  # BatchNorm biases learn at this multiple of lr (airbench: 64)
    decay_biases: bool = (
        False  # weight-decay biases and BN biases too, at the weights' rate per step
    )
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps; 0 = once per epoch
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)


DEFAULT_STUDENTS = ("ce", "kd", "erde")  # the students of a run when distill.students is None
STUDENT_METHODS = DEFAULT_STUDENTS  # (older name)


SPEC_SETTINGS = ("alpha", "beta", "gamma", "temperature", "uncertain_above")  # a spec may set these


@dataclass
class StudentSpec:
    """One student of a side-by-side run: a name, its method and the loss settings it changes.

    Settings left at None are ``distill``'s. The student trains into ``student_<name>``;
    e.g. ``StudentSpec("erde_g2", "erde", gamma=2.0)`` next to the default three makes a
    gamma ablation one loop with one teacher forward per batch.
    """

    name: str = "erde"  # folder student_<name> and the report's model name
    method: str = "erde"  # ce | kd | erde
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    temperature: float | None = None
    uncertain_above: float | None = None  # sets the "uncertain or incorrect" mask (cannot unset it)

    def settings(self) -> dict[str, float]:
        """The loss settings this student changes: ``{field: value}`` for those not None."""
        return {k: getattr(self, k) for k in SPEC_SETTINGS if getattr(self, k) is not None}


@dataclass
class DistillConfig:
    method: str = "erde"  # a registered method: ce | kd | erde | yours (train-student's)
    alpha: float = 1.0  # weight of cross-entropy on labels
    beta: float = 1.0  # weight of the KL distillation term
    gamma: float = 1.0  # weight of the entropy term (erde only)
    temperature: float = 4.0  # KD temperature tau
    exit_mapping: list[int] | None = (
        None  # teacher exit for each student exit; None = by exit_mapping_by
    )
    teacher_amp: bool | None = None  # teacher forward in bf16; None = as student_train.amp
    exit_mapping_by: str = "depth"  # depth (exit index) | cost (share of MACs): for other families
    # erde: a teacher exit that is right but unsure (normalised entropy H / log K above this) also
    # gets the entropy term instead of KL, the "uncertain or incorrect" reading; None = incorrect only
    uncertain_above: float | None = None
    # the students trained side by side by `erde run` / `erde reproduce`; None = ce, kd and erde
    students: list[StudentSpec] | None = None


@dataclass
class EvalConfig:
    num_thresholds: int = 41  # grid size of the threshold sweep
    rules: list[str] = field(default_factory=lambda: ["entropy", "max_softmax"])  # exit rules swept
    tolerance: float = 0.005  # accuracy drop allowed for "equal accuracy" (0.005 = 0.5 points)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(arch="resnet8"))
    teacher_train: TrainConfig = field(default_factory=TrainConfig)
    student_train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # seeds data split, initialisation and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
