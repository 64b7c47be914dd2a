"""Typed configuration schemas, registered with Hydra's ConfigStore.

The root schema is strict: an unknown key anywhere in ``data``, ``trainer``, ``metrics`` or at the top level
fails at start-up. Model configs carry a ``_target_`` (the user swaps the whole method), and their keys are
checked against the model class's signature when it is built, before any data is touched for training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from cryobench_lab.errors import InputError


@dataclass
class DatasetHints:
    """What ``experiment=cryobench`` gives the methods on one dataset: conf/experiment/cryobench*.yaml interpolate
    these, no code reads them. A dataset config sets all of them or none (``hints: null``)."""

    n_classes: int = MISSING  # K of the discrete classifiers (classify3d, multiclass, focused)
    mixture_classes: int = MISSING  # K of the mixture of neural fields (hydra)
    mixture_latent_dim: int = MISSING  # d of each of hydra's fields
    mixture_decoder: str = MISSING  # separate | shared: hydra's and classify3d's K fields (shared for large K)
    multiclass_pad: int = MISSING  # Fourier oversampling of multiclass's K volumes
    per_conformation: bool = MISSING  # metrics.per_conformation (false: one image per state, per-image FSC only)


@dataclass
class DataConfig:
    """Where particles come from and how they are served.

    A dataset is either a simulator ``preset`` (generated on first use, then cached) or user files
    (``particles`` plus optional ``poses``/``ctf``/``labels``/``gt_volumes``/``structure``).
    """

    name: str = MISSING
    # --- simulator presets (see data/presets.py); ignored for user data
    preset: Optional[str] = None
    structures: Optional[List[str]] = None  # PDB/mmCIF files replacing the preset's own
    n_particles: Optional[int] = None  # images PER STATE (simulated presets); metrics.json n_particles_total counts all
    snr: Optional[float] = None
    sim_seed: int = 0
    # further keys of the preset's simulator recipe (data/presets.py), e.g. {n_states: 13, defocus_range: [..]};
    # typed Any for the same reason as domains below
    recipe: Any = None
    cache_dir: Optional[str] = None
    # --- a published benchmark download (layout=cryobench: see io/cryobench.py; data.snr picks images/snr<SNR>)
    layout: Optional[str] = None  # None: preset or user files; cryobench: read data.root in CryoBench's layout
    root: Optional[str] = None  # the CryoBench dataset folder (layout=cryobench)
    # --- user data
    particles: Optional[str] = None  # .star, .cs, .txt or .mrcs
    poses: Optional[str] = None  # cryoDRGN poses pickle (overrides the star/cs poses)
    # None: the star/cs CTF (particles without one are refused); a cryoDRGN CTF pickle overrides it;
    # "none": the images have no CTF (CTF = 1), whatever the files say
    ctf: Optional[str] = None
    labels: Optional[str] = None  # .npy or .pkl, one integer label per particle
    gt_volumes: Optional[str] = None  # folder of .mrc files, one per state, paired by the number in their names
    # base atomic model for atom-based methods: a path, or (presets) a bundled file's name, e.g. adk/pdb1ake.pdb.gz;
    # None: the preset's state 0
    structure: Optional[str] = None
    gt_structures: Optional[str] = None  # folder of per-state atomic models (state_XXX.cif/.pdb) in label order
    # residue groups of the atom metrics: {name: [first, last] residue number}; the rest is CORE. None: the
    # chains are the groups. Typed Any: a typed Optional[Dict] node rejects data.domains={...} on the command line
    domains: Any = None
    datadir: Optional[str] = None  # folder that relative stack paths in a star/cs file refer to
    apix: Optional[float] = None  # Å/px, used only where the files lack it
    # --- serving
    box_size: Optional[int] = None  # training box (px); presets simulate at it, user data is Fourier-cropped to it
    invert: Optional[bool] = None  # None: from the dataset's meta.json, else True (cryoDRGN's default)
    lazy: Optional[bool] = None  # None: in memory when the stack fits memory_cap_gb, else lazy
    memory_cap_gb: float = 4.0
    window: bool = True  # soft real-space window before Fourier cropping
    batch_size: int = 64
    # training order: random (uniform permutation) | chunked (permute chunks of chunk_size contiguous
    # particles, then images within a window of shuffle_window chunks: sequential reads for lazy stacks)
    shuffle: str = "random"
    chunk_size: int = 1024
    shuffle_window: int = 4
    val_fraction: float = 0.1
    split_seed: int = 0
    num_workers: int = 0
    hints: Optional[DatasetHints] = None  # per-dataset sizes of experiment=cryobench (conf/data/cryobench_*.yaml)


@dataclass
class TrainerConfig:
    """The subset of ``lightning.Trainer`` arguments a run may set."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: Optional[int] = None  # None: the model's own default
    max_steps: int = -1
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = None
    enable_progress_bar: bool = True
    deterministic: bool = False
    limit_train_batches: Optional[float] = None


@dataclass
class LoggerConfig:
    """Experiment tracking backends: ``wandb`` (offline unless logged in or ``WANDB_MODE`` is set) and ``csv``."""

    backends: List[str] = field(default_factory=lambda: ["wandb", "csv"])
    project: str = "cryobench_lab"
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class MetricsConfig:
    """What the shared scorer computes after training."""

    fsc_mask: str = "none"  # none | sphere | gt (thresholded, dilated, soft-edged ground truth) | dataset (its own mask)
    per_image_n: int = 100  # images scored by the per-image FSC protocol; 0 skips it
    eval_every: int = 0  # also score every n epochs during training; 0: only at the end
    # write z.<epoch>.pkl (cryoDRGN's per-epoch latents) every n epochs; 0: only the final z.pkl. Costs an
    # inference pass over the particles each time (counted in train/wall_time_s), hence off by default.
    latents_every: int = 0
    save_volumes: bool = True
    figures: bool = True
    # false: skip the per-conformation protocol (Spike-MD: one image per state, so per-image FSC is its metric)
    per_conformation: bool = True
    references: bool = True  # also score the consensus floor and the oracle beside the method (val/floor_*, val/oracle_*)


@dataclass
class PosesConfig:
    """Where poses come from (conf/poses): the data's (``given``) or a search (``search``, ab initio).

    The search keys are cryobench_lab.poses.source.PoseSchedule's and cryobench_lab.poses.search.SearchConfig's.
    """

    source: str = "given"  # given | search
    pretrain_epochs: int = 1  # epochs with random poses before the first search
    global_epochs: int = 10  # epochs whose first pass over an image searches all of SO(3) × shifts
    local_epochs: int = 2  # then epochs of local search around the current poses; SGD refinement after
    local_step_deg: float = 3.75
    render_every: int = 4  # searched batches between rebuilds of the search references
    lr_rot: float = 0.01  # refinement rates: radians, px
    lr_trans: float = 0.1
    reference: str = "table"  # searched against: table (backprojection of the current poses) | field
    field_epochs: int = 5  # reference table: searched epochs against the field before the table takes over
    base_spacing_deg: float = 15.0  # global grid (≈4.4k rotations)
    levels: int = 3  # coarse-to-fine levels of the global search, each halving the steps
    n_keep: int = 8  # candidates kept per image after the global level
    max_shift: float = 0.1  # shift range, fraction of the box
    max_radius: float = 0.5  # search band radius cap, fraction of D/2
    min_radius: int = 4  # px


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    poses: PosesConfig = field(default_factory=PosesConfig)
    seed: int = 0
    output_dir: str = "${hydra:runtime.output_dir}"
    # None: continue from output_dir/checkpoints/last.ckpt when it exists; true: require it; false: start over
    resume: Optional[bool] = None
    on_nonfinite: str = "stop"  # NaN/Inf loss or gradient: stop (one-line error) | skip (count skipped steps)
    # sweeps (sweeps.py): skip a run whose output_dir holds a complete metrics.json of the same config
    skip_finished: bool = False
    threads: Optional[int] = None  # torch intra-op threads of this run (None: torch's default)


def _positive(v) -> bool:
    return v >= 1


def _positive_or_null(v) -> bool:
    return v is None or v >= 1


def _not_negative(v) -> bool:
    return v >= 0


# Ranges the types cannot express: (dotted key, test, what the value must be). Checked at start-up, before a run
# folder exists; Lightning would run forever at trainer.max_epochs=-1 and fail deep inside at batch_size=0.
VALUE_CHECKS = (
    ("data.batch_size", _positive, "a positive integer (images per batch)"),
    ("data.n_particles", _positive_or_null, "a positive integer (images per state) or null"),
    ("data.chunk_size", _positive, "a positive integer"),
    ("data.shuffle_window", _positive, "a positive integer"),
    ("data.num_workers", _not_negative, "0 or more"),
    ("data.memory_cap_gb", lambda v: v > 0, "a positive number (GB)"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("trainer.max_epochs", _positive_or_null, "a positive integer or null (the model's own default)"),
    ("trainer.num_nodes", _positive, "a positive integer"),
    ("trainer.log_every_n_steps", _positive, "a positive integer"),
    ("metrics.eval_every", _not_negative, "0 (only at the end) or a positive integer"),
    ("metrics.per_image_n", _not_negative, "0 (skip) or a positive integer"),
    ("threads", _positive_or_null, "a positive integer or null"),
)


def validate(cfg) -> None:
    """InputError naming the first value of :data:`VALUE_CHECKS` that is out of range."""
    defaults = OmegaConf.structured(TrainConfig)
    for key, ok, what in VALUE_CHECKS:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            default = OmegaConf.select(defaults, key, default=None)
            example = f", e.g. {key}={default}" if default is not None else ""
            raise InputError(f"{key}={value}: must be {what}{example}")


def _smoke(full, small, *, _root_):
    """``${smoke:<full>,<small>}``: ``small`` when the run was started with ``+smoke=true`` (which adds the
    top-level key ``smoke``; experiment configs shrink to a CPU run that way), else ``full``."""
    return small if _root_.get("smoke", False) else full


def _job_dirname(dirname: str) -> str:
    """``${job_dirname:${hydra.job.override_dirname}}``: a sweep job's folder name from its overrides, usable
    as one path component: a value holding a path becomes its last component plus a hash of the whole path."""
    import hashlib

    def one(item: str) -> str:
        key, sep, value = item.partition("=")
        if "/" in value:
            value = f"{value.rstrip('/').split('/')[-1]}~{hashlib.sha1(value.encode()).hexdigest()[:6]}"
        return f"{key}{sep}{value}"

    name = ",".join(one(item) for item in dirname.split(",")) if dirname else "default"
    return name if len(name) <= 200 else f"{name[:180]}~{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("smoke"):
        OmegaConf.register_new_resolver("smoke", _smoke)
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", _job_dirname)
