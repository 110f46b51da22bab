"""Training configuration: declarative sections, YAML recipes, `section.key=value` overrides.

A config is a tree of dataclasses (one per section). Loading goes
    embedded defaults  <-  YAML file  <-  command-line overrides
and every value is type-checked against the dataclass field it lands in, so a typo in
a key, a wrong type or an impossible value fails at once with one line that names the
key (``ConfigError``), before any data or model is touched.

The embedded default (no ``--config``) is the demo job: the built-in demo dataset,
ResNet-18 at small resolution with one SSAL branch, a few epochs on CPU.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from pipeline.tracking import credentials, store
from pipeline.train.schema import SchemaError, merge, merge_file

REPO_ROOT = Path(__file__).resolve().parents[2]

# a bad configuration value: one line naming the key and the fix (the schema's error, under the config's name)
ConfigError = SchemaError


@dataclass
class DataConfig:
    dataset: Literal["demo", "imagenet", "tinyimagenet"] = "demo"  # names the run and the recipe
    root: str = "data/demo"  # folder with train.beton, val.beton and manifest.json
    write_demo_if_missing: bool = True  # dataset=demo only: write the demo betons on first use
    # class | superclass: the primary task's labels. superclass trains on the planted super-classes of
    # a manifest that has them (the demo set: 8 super-classes of 4 classes; MAXL's setting, where the
    # generator may rediscover the classes inside each super-class as its auxiliary labels)
    labels: Literal["class", "superclass"] = "class"
    batch_size: int = 64  # per process
    val_batch_size: int = 128  # per process
    num_workers: int = 2  # FFCV decoding threads per process
    # auto: random with os_cache, quasi_random without (pipeline/train/data_access.py)
    order: Literal["auto", "quasi_random", "random"] = "auto"
    os_cache: bool = True  # read the beton through the OS page cache (false: when it does not fit in RAM)
    min_res: int = 32  # progressive resizing: train crop size ramps min_res -> max_res
    max_res: int = 32
    start_ramp: int = 0  # epoch where the ramp starts (0-based)
    end_ramp: int = 0  # epoch where max_res is reached
    val_res: int = 32  # center crop size at evaluation (decoded at val_res * 256/224)
    # evaluation preprocessing: center = crop 224/256 of the shorter side (torchvision's Resize(256)
    # + CenterCrop(224)); squash256 = resize both sides to 256 ignoring the aspect ratio, crop 224
    # (the DKS authors' evaluation); either way the crop is resized to val_res
    val_preprocess: Literal["center", "squash256"] = "center"
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    # brightness, contrast and saturation jitter of strength s (torchvision's ColorJitter(s, s, s)),
    # seeded per (seed, epoch, sample) like the crop and flip; 0 = off
    color_jitter: float = 0.0


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    blurpool: bool = False
    zero_init_residual: bool = False
    # capacity baselines (SSAL paper Table 2): 1.5 = WideResnet18; stem_convs 4 (x 256) =
    # DeepResnet18, stem_conv_width 512 = DWResnet18 (extra 3x3 conv-BN-ReLU before layer1)
    width_multiplier: float = 1.0  # scales the stem and every stage's channels (> 0)
    stem_convs: int = 0  # extra conv layers between the stem and layer1 (>= 0)
    stem_conv_width: int = 256  # their filters (>= 1; not scaled by width_multiplier)
    bn_momentum: float = 0.1  # of every BatchNorm, branches included (PyTorch's convention and default)


#: the methods whose branches classify groups of the classes (groupings from method.groups_file / num_groups)
GROUPED_METHODS = ("ssal", "gapcat")


@dataclass
class MethodConfig:
    name: Literal["baseline", "ssal", "dks", "ds", "gapcat", "maxl"] = "ssal"
    # SSAL / GapCat groupings: a JSON written by pipeline/groups.py (class names per group),
    # or, without one, seeded random groupings with these numbers of groups.
    groups_file: str = ""
    num_groups: list[int] = field(default_factory=lambda: [8])
    # keyword options of ssal_models.build_model for this method (stages, eta, weights ...)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 0.5  # per 256 images of global batch: lr = lr * batch_size * world_size / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-5  # not applied to BatchNorm weights and biases unless decay_norm_and_bias
    decay_norm_and_bias: bool = False  # true: weight decay on every parameter (the papers' SGD)
    label_smoothing: float = 0.1
    grad_clip_norm: float = 0.0  # 0 = off


@dataclass
class ScheduleConfig:
    kind: Literal["step", "triangular", "cosine"] = "triangular"  # all per iteration
    epochs: int = 4
    warmup_epochs: float = 0.0  # cosine / step: linear warm-up from 0
    peak_epoch: float = 1.0  # triangular: linear up to the peak, then linear down to end_lr_ratio
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])  # step
    gamma: float = 0.1  # step
    end_lr_ratio: float = 0.0  # triangular / cosine: final lr as a fraction of the peak


@dataclass
class TrainConfig:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "bf16"  # GPU only; CPU runs in float32
    channels_last: bool = True  # GPU only
    compile: bool = False  # torch.compile the training model, static shapes (compiled once per resolution)
    ema_decay: float = 0.0  # 0 = no EMA of the weights; else e.g. 0.9999 (evaluated as its own head)
    # deterministic algorithms where torch offers them, and a bit-exact resume at any number of ranks (DDP with
    # find_unused_parameters, BN statistics averaged every step: docs/reliability.md)
    deterministic: bool = True
    max_steps_per_epoch: int = 0  # 0 = the whole epoch; >0 caps it (quick trials, tests)
    log_every: int = 20  # iterations between plain log lines when not on a TTY
    # steps between the ranks' agreement on "a loss was non-finite" / "stop requested": the one host-device
    # synchronisation of a training step. 8: a GPU step of the recipes takes 0.1-0.3 s, so a stop (SLURM's
    # pre-end signal comes a minute or more ahead) is seen within 1-2 s, and the GPU waits for the host once
    # per 8 steps instead of several times a step. The epoch's last step is always checked (no non-finite
    # state is checkpointed); 1 = every step, as before.
    sync_every: int = 8
    # seconds without a finished training step after which a rank counts as hung and the job fails with the
    # hang exit code (pipeline/train/watchdog.py); also the process group's collective timeout. 0 = auto:
    # max(120 s, 5 x the slowest step seen), the first step (compilation, loader start) not judged
    hang_timeout_s: float = 0.0
    threads: int = 0  # torch intra-op threads on CPU (0 = number of cores / processes)


@dataclass
class EvalConfig:
    every_n_epochs: int = 1  # and always after the last epoch
    tta_flip: bool = False  # average the outputs of the image and its mirror
    topk: list[int] = field(default_factory=lambda: [1, 5])
    # a seeded share of the *train* split kept out of training and evaluated at the end; its
    # confusion matrix (confusion_holdout.npy) feeds SSAL's grouping stage without touching val
    holdout_fraction: float = 0.0


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = the SQLite store <runs_root>/mlflow.db; or http://host:port of a server
    experiment: str = "ssal-pipeline"  # one experiment per study
    run_name: str = ""  # "" = <dataset>-<arch>-<method>
    tags: dict[str, str] = field(default_factory=dict)
    log_model: bool = True  # the final model as an MLflow model (runs:/<run id>/model) + final_weights.pt


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 1
    keep_best: bool = True  # best.pt by val top-1 of the main head
    # 0 = off; else a mid-epoch last.pt (the exact state a stop writes) once this much wall time has passed
    # since the last checkpoint, rank 0's clock deciding at a train.sync_every agreement; training goes on
    every_minutes: float = 0.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runs_root: str = "runs"  # where run folders and the default MLflow store live
    output_dir: str = ""  # "" = <runs_root>/<experiment>/<run_name>

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, for MLflow params."""
        return dict(_flatten(self.to_dict()))

    @property
    def run_name(self) -> str:
        return self.tracking.run_name or f"{self.data.dataset}-{self.model.arch}-{self.method.name}"

    @property
    def run_dir(self) -> Path:
        if self.output_dir:
            return resolve_path(self.output_dir)
        return resolve_path(self.runs_root) / self.tracking.experiment / self.run_name


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and prefix == "":
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def resolve_path(path: str | Path) -> Path:
    """Relative paths in configs are relative to the repository root, not the cwd."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def tracking_uri(cfg: Config) -> str:
    """The run's tracking store: ``tracking.uri``, else the SQLite store under ``runs_root`` (created)."""
    return cfg.tracking.uri or store.default_tracking_uri(resolve_path(cfg.runs_root))


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=0.1` -> (["optim", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    for part in reversed(path):
        value = {part: value}
    return value


def override_list(value: Any, key: str) -> list[str]:
    """Overrides as a YAML file writes them (a study's), a mapping {section.key: value} or a list of
    'section.key=value' strings -> ['section.key=value', ...] for :func:`parse_override` (values as JSON = YAML)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={v if isinstance(v, str) and not _needs_quoting(v) else json.dumps(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(x, str) and "=" in x for x in value):
        return list(value)
    raise ConfigError(f"{key}: expected a mapping {{section.key: value}} or a list of 'section.key=value' strings, "
                      f"got {value!r}")


def _needs_quoting(text: str) -> bool:
    """A string that YAML would read back as something else (a number, a bool, a list ...)."""
    try:
        return not isinstance(yaml.safe_load(text), str)
    except yaml.YAMLError:
        return True


# ----------------------------------------------------------------------------- checks

def validate(cfg: Config) -> None:
    """Value checks that do not need files and that the types do not say: ranges, consistency between keys."""
    flat = cfg.flat()
    positive = [
        "data.batch_size", "data.val_batch_size", "data.min_res", "data.max_res", "data.val_res",
        "schedule.epochs", "eval.every_n_epochs", "checkpoint.every_n_epochs", "train.log_every",
        "train.sync_every",
    ]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]}")
    non_negative = [
        "data.num_workers", "data.start_ramp", "data.end_ramp", "optim.weight_decay",
        "optim.grad_clip_norm", "schedule.warmup_epochs", "train.max_steps_per_epoch", "train.threads",
        "train.hang_timeout_s", "checkpoint.every_minutes",
    ]
    for key in non_negative:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]}")
    if not (cfg.model.width_multiplier > 0 and math.isfinite(cfg.model.width_multiplier)):
        raise ConfigError(f"model.width_multiplier: must be a finite number > 0 (1.5 = 50% more filters), "
                          f"got {cfg.model.width_multiplier}")
    if math.floor(64 * cfg.model.width_multiplier + 0.5) < 1:  # as ssal_models.backbones rounds
        raise ConfigError(f"model.width_multiplier: {cfg.model.width_multiplier} leaves the stem with 0 channels "
                          f"(use >= 1/128)")
    if cfg.model.stem_convs < 0:
        raise ConfigError(f"model.stem_convs: must be >= 0 (extra conv layers before layer1), got {cfg.model.stem_convs}")
    if cfg.model.stem_conv_width < 1:
        raise ConfigError(f"model.stem_conv_width: must be >= 1, got {cfg.model.stem_conv_width}")
    if not 0 < cfg.model.bn_momentum <= 1:
        raise ConfigError(f"model.bn_momentum: must be in (0, 1] (PyTorch's convention: the weight of the "
                          f"batch statistics; default 0.1), got {cfg.model.bn_momentum}")
    scale = cfg.data.rrc_scale
    if len(scale) != 2 or not (0 < scale[0] <= scale[1] and math.isfinite(scale[1])):
        raise ConfigError(f"data.rrc_scale: must be [min, max] area fractions with 0 < min <= max "
                          f"(e.g. [0.08, 1.0]), got {scale}")
    if not 0 <= cfg.data.color_jitter < 1:
        raise ConfigError(f"data.color_jitter: must be in [0, 1) (0 = off; the SSAL authors use 0.4), "
                          f"got {cfg.data.color_jitter}")
    if not (cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)):
        raise ConfigError(f"optim.lr: must be a positive number, got {cfg.optim.lr}")
    if not 0 <= cfg.optim.label_smoothing < 1:
        raise ConfigError(f"optim.label_smoothing: must be in [0, 1), got {cfg.optim.label_smoothing}")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1) (0 = off), got {cfg.train.ema_decay}")
    if cfg.data.min_res > cfg.data.max_res:
        raise ConfigError(f"data.min_res ({cfg.data.min_res}) must be <= data.max_res ({cfg.data.max_res})")
    if cfg.data.start_ramp > cfg.data.end_ramp:
        raise ConfigError(f"data.start_ramp ({cfg.data.start_ramp}) must be <= data.end_ramp ({cfg.data.end_ramp})")
    if cfg.schedule.kind == "triangular" and not 0 <= cfg.schedule.peak_epoch <= cfg.schedule.epochs:
        raise ConfigError(f"schedule.peak_epoch: must be within [0, schedule.epochs={cfg.schedule.epochs}]")
    if cfg.schedule.warmup_epochs > cfg.schedule.epochs:
        raise ConfigError(f"schedule.warmup_epochs: must be <= schedule.epochs={cfg.schedule.epochs}")
    if not 0 <= cfg.schedule.end_lr_ratio <= 1:
        raise ConfigError(f"schedule.end_lr_ratio: must be in [0, 1], got {cfg.schedule.end_lr_ratio}")
    if not 0 <= cfg.eval.holdout_fraction <= 0.5:
        raise ConfigError(f"eval.holdout_fraction: must be in [0, 0.5], got {cfg.eval.holdout_fraction}")
    if any(k < 1 for k in cfg.eval.topk):
        raise ConfigError(f"eval.topk: every k must be >= 1, got {cfg.eval.topk}")
    if cfg.tracking.uri:
        check_tracking_uri(cfg.tracking.uri)
    if cfg.method.name in GROUPED_METHODS and not cfg.method.groups_file and not cfg.method.num_groups:
        raise ConfigError("method.num_groups: SSAL needs groupings: set method.groups_file or method.num_groups")
    if cfg.method.groups_file and not resolve_path(cfg.method.groups_file).is_file():
        raise ConfigError(f"method.groups_file: no such file {cfg.method.groups_file}; compute it from a baseline "
                          f"run with `python pipeline/groups.py`")


TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
_URI_FIX = "use http://HOST:PORT (a tracking server), sqlite:////abs/path/mlflow.db, or leave it empty for <runs_root>/mlflow.db"


def check_tracking_uri(uri: str) -> None:
    """A typo here would lose all tracking (MLflow rejects every call): refuse it before training."""
    problem = credentials.uri_problem(uri)  # first: the messages below echo the URI
    if problem:
        raise ConfigError(problem)
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0].lower()  # postgresql+psycopg2://...
    if not parsed.scheme or "://" not in uri:
        raise ConfigError(f"tracking.uri: '{uri}' has no scheme (a server: tracking.uri=http://{uri}); {_URI_FIX}")
    if scheme not in TRACKING_SCHEMES:
        close = difflib.get_close_matches(scheme, TRACKING_SCHEMES, n=1)
        hint = f" (did you mean {close[0]}://{uri.split('://', 1)[1]}?)" if close else ""
        raise ConfigError(f"tracking.uri: '{uri}': unknown scheme '{parsed.scheme}'{hint}; {_URI_FIX}")
    if scheme in ("http", "https") and not parsed.hostname:
        raise ConfigError(f"tracking.uri: '{uri}' names no host; {_URI_FIX}")
    if scheme in ("http", "https"):
        try:
            parsed.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ConfigError(f"tracking.uri: '{uri}': the port is not a number; {_URI_FIX}") from None
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise ConfigError(f"tracking.uri: '{uri}': a SQLite URI has three slashes before the path; {_URI_FIX}")


# ----------------------------------------------------------------------------- public API


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Embedded defaults <- YAML file <- overrides, validated. Raises ConfigError."""
    cfg = Config()
    if path is not None:
        merge_file(cfg, path, "--config")
    for text in overrides:
        key_path, value = parse_override(text)
        merge(cfg, _nest(key_path, value))
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    merge(cfg, values)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from ssal_datasets.files import atomic_write

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda handle: handle.write(text.encode()))


def describe_keys() -> str:
    """Every key with its default, for --help."""
    lines = []
    for name, value in Config().flat().items():
        lines.append(f"  {name} = {json.dumps(value)}")
    return "\n".join(lines)
