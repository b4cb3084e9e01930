"""The run configuration: one schema, YAML files that inherit from each other, `-o` overrides.

`SCHEMA` below is the single source of truth for every key: its default, what values it allows and
what it means. A config file only states what differs from the defaults; `_base_: other.yaml` (a
path relative to the file, or a list of them) is deep-merged underneath it. Command-line overrides
follow the Paddle ecosystem convention `-o section.key=value`, the value parsed as YAML.

Files are read with `yaml.SafeLoader` only, so a YAML tag that would construct a Python object is
rejected. Every problem a user can cause (unknown key, wrong type, value out of range, unreadable
file) is a `UserError` naming the key or file and what is allowed.
"""

import copy
import difflib
import math
import os
import re
import reprlib

from rdrop import atomic
from rdrop.errors import UserError

import yaml

BASE_KEY = "_base_"
# Far above any real config (the largest here has about 60 values), far below what makes validation
# slow: YAML aliases can make a few lines expand to billions of values ("billion laughs").
MAX_CONFIG_VALUES = 10_000
# Likewise for depth and length (a run config is three levels deep; paths are at most 4096 bytes on
# Linux), far below what breaks the readers: PyYAML builds nested values by recursion, so a few
# thousand `[` exhaust Python's stack, and Python refuses to read an integer of more than 4300 digits.
MAX_NESTING = 16
MAX_SCALAR_CHARS = 4096
MAX_BASES = 16  # `_base_` files inheriting from each other in one chain
# Integers are bounded so that every value fits where the run writes it (Paddle and NumPy seeds,
# int32 counters, VisualDL's hyper-parameter table at the end of the run).
MAX_INTEGER = 2**31 - 1


class _Oversized(yaml.YAMLError):
    """A YAML text nested too deep or holding too long a value (see MAX_NESTING)."""

    def __init__(self, problem, mark):
        super().__init__(f"{problem} (at line {mark.line + 1}, column {mark.column + 1})")


class _SafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads `1e-3` as a number (YAML 1.1 needs `1.0e-3`; people write lr: 1e-3),
    and stops at the first value nested deeper than MAX_NESTING or longer than MAX_SCALAR_CHARS."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if self._depth >= MAX_NESTING:
            raise _Oversized(f"nests values more than {MAX_NESTING} levels deep", event.start_mark)
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR_CHARS:
            raise _Oversized(
                f"holds a value {len(event.value)} characters long (at most {MAX_SCALAR_CHARS})", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _safe_load(stream):
    return yaml.load(stream, Loader=_SafeLoader)


def _too_large(content):
    """Why `content` is too large to be a config, or None. Aliases (*name) repeat an anchored value
    (&name) wherever they appear, so a short text can expand to billions of values, nest deeper than
    it is written, or hold a list that contains itself: the walk stops at the first bound passed."""
    count, pending = 0, [(content, 1)]
    while pending:
        value, depth = pending.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            return (
                f"expands to more than {MAX_CONFIG_VALUES} values (YAML aliases *name repeat an anchored "
                f"value &name wherever they appear, and nested ones multiply)"
            )
        if depth > MAX_NESTING:
            return f"nests values more than {MAX_NESTING} levels deep"
        if isinstance(value, str) and len(value) > MAX_SCALAR_CHARS:
            return f"holds a value {len(value)} characters long (at most {MAX_SCALAR_CHARS})"
        if isinstance(value, dict):
            pending.extend((child, depth + 1) for child in [*value.keys(), *value.values()])
        elif isinstance(value, list):
            pending.extend((child, depth + 1) for child in value)
    return None


def _too_large_error(source, reason):
    return UserError(
        f"{source[0].upper()}{source[1:]} {reason}. A run config is a few dozen short values, three "
        f"levels deep; write it out plainly."
    )


def check_size(content, source):
    """A UserError naming `source` if `content` (plain data read from a config input) is too large."""
    reason = _too_large(content)
    if reason is not None:
        raise _too_large_error(source, reason)


class Allowed:
    """A value constraint: `accepts(value)` decides, `description` tells the user what is allowed,
    `normalize(value)` turns an accepted value into the one the run uses."""

    def __init__(self, description, accepts, normalize=lambda value: value):
        self.description = description
        self.accepts = accepts
        self.normalize = normalize


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum, nullable=False, maximum=MAX_INTEGER):
    shown_maximum = "2^31-1" if maximum == MAX_INTEGER else maximum
    allowed = Allowed(f"an integer in [{minimum}, {shown_maximum}]", lambda v: _is_int(v) and minimum <= v <= maximum)
    return or_null(allowed) if nullable else allowed


def number(minimum, maximum=math.inf, minimum_inclusive=True, maximum_inclusive=True):
    low = "[" if minimum_inclusive else "("
    high = "]" if maximum_inclusive and maximum != math.inf else ")"
    description = f"a number in {low}{minimum}, {maximum if maximum != math.inf else 'inf'}{high}"

    def accepts(value):
        if not _is_number(value):
            return False
        above = value >= minimum if minimum_inclusive else value > minimum
        below = value <= maximum if maximum_inclusive else value < maximum
        return above and below

    return Allowed(description, accepts)


def one_of(*choices):
    return Allowed("one of " + ", ".join(str(choice) for choice in choices), lambda v: v in choices)


def boolean():
    return Allowed("true or false", lambda v: isinstance(v, bool))


def text():
    return Allowed("a string", lambda v: isinstance(v, str) and v != "")


def path():
    """A file or folder path; a leading `~` is the user's home folder, as in a shell."""
    return Allowed("a path", lambda v: isinstance(v, str) and v != "", os.path.expanduser)


def or_null(allowed):
    return Allowed(
        allowed.description + " or null",
        lambda v: v is None or allowed.accepts(v),
        lambda v: None if v is None else allowed.normalize(v),
    )


def config_keys():
    def accepts(value):
        return isinstance(value, list) and all(
            isinstance(v, str) and v.partition(".")[2] in SCHEMA.get(v.partition(".")[0], {}) for v in value
        )

    return Allowed("a list of section.key names", accepts)


def scale_range():
    def accepts(value):
        return (
            isinstance(value, list)
            and len(value) == 2
            and all(_is_number(v) for v in value)
            and 0 < value[0] <= value[1] <= 1
        )

    return Allowed("a list [min, max] with 0 < min <= max <= 1", accepts)


class Key:
    """One config key. `free_on_resume`: changing it never changes what is trained (logging, saving,
    paths, speed), so a resumed run may change it without `train.resume_changes`. `defines_run`: the
    key is one of those that say what a run trains (VisualDL's hyper-parameter table lists them); by
    default the keys that are not free on resume."""

    def __init__(self, default, allowed, doc, free_on_resume=False, defines_run=None):
        self.default = default
        self.allowed = allowed
        self.doc = doc
        self.free_on_resume = free_on_resume
        self.defines_run = not free_on_resume if defines_run is None else defines_run


SCHEMA = {
    "model": {
        "name": Key(
            "vit_b16",
            text(),
            "Architecture: a preset (ViT-Ti/S/B/L with 16 or 32 px patches: `vit_ti16`, `vit_s16`, `vit_b16`, "
            "`vit_b32`, `vit_l16`, `vit_l32`), or `vit` with the five dimensions below.",
        ),
        "img_size": Key(
            224, integer(1, maximum=4096), "Input resolution in pixels (square); a multiple of the patch size."
        ),
        "num_classes": Key(100, integer(2), "Classifier outputs; labels must lie in [0, num_classes)."),
        "dropout": Key(
            0.1,
            number(0, 1, maximum_inclusive=False),
            "Dropout after the embeddings and twice in every MLP (after GELU and after fc2). "
            "R-Drop needs it above 0: it is what makes the two passes differ.",
        ),
        "attn_dropout": Key(
            0.0,
            number(0, 1, maximum_inclusive=False),
            "Dropout on the attention probabilities and after the attention projection "
            "(both use this rate in the public R-Drop ViT code).",
        ),
        "drop_path": Key(
            0.0,
            number(0, 1, maximum_inclusive=False),
            "Stochastic depth rate of the last block (linear from 0 in the first).",
        ),
        "pretrained": Key(
            None,
            or_null(text()),
            "Weights to start from: a Google `.npz`, a `.pdparams`, a checkpoint folder, or "
            "an http(s) URL (downloaded once into Paddle's cache); null trains from scratch.",
            free_on_resume=True,  # a resumed run starts from its checkpoint's weights instead
            defines_run=True,
        ),
        "patch_size": Key(None, integer(1, nullable=True), "Patch size in pixels (`name: vit` only)."),
        "embed_dim": Key(None, integer(1, nullable=True), "Token width (`name: vit` only)."),
        "depth": Key(None, integer(1, nullable=True), "Number of transformer blocks (`name: vit` only)."),
        "num_heads": Key(None, integer(1, nullable=True), "Attention heads; divides embed_dim (`name: vit` only)."),
        "mlp_dim": Key(None, integer(1, nullable=True), "Hidden width of the MLP (`name: vit` only)."),
        "cpu_kernels": Key(
            True,
            boolean(),
            "On the CPU (eager float32), run layer norm, GELU and dropout through this "
            "repository's multi-threaded kernels (`models/cpu_kernels.cc`, compiled once on "
            "first use; Paddle's kernels if that fails) and Linear with a faster bias "
            "gradient; false uses Paddle's kernels. No effect on GPUs.",
            free_on_resume=True,
        ),
    },
    "rdrop": {
        "alpha": Key(
            0.3,
            number(0),
            "Weight of the symmetric KL between the two dropout passes; 0 trains the plain single-pass baseline.",
        ),
        "kl_reduction": Key(
            "sum",
            one_of("sum", "batchmean", "mean"),
            "How the KL is reduced over the micro-batch: `sum` as the public R-Drop code "
            "(its weight grows with micro_batch_size), `batchmean` per image (paper's "
            "alpha = 2 x this alpha), `mean` per logit.",
        ),
        "concat_batch": Key(
            True,
            boolean(),
            "Run both dropout samples as one forward pass on the batch concatenated with "
            "itself (faster); false runs two separate passes.",
        ),
    },
    "data": {
        "dataset": Key(
            "cifar100",
            one_of("cifar100", "cifar10", "folder", "filelist", "digits"),
            "`cifar100` or `cifar10` (the official python archives); `folder`: one sub-folder of images "
            "per class under `data.train_dir` and `data.test_dir`; `filelist`: PaddleClas lists "
            "(`data.root`, `data.train_list`, `data.test_list`); `digits`: the UCI digits shipped "
            "with scikit-learn (offline quickstart).",
        ),
        "data_file": Key(
            None,
            or_null(path()),
            "Path of `cifar-100-python.tar.gz` or `cifar-10-python.tar.gz`; null uses Paddle's cache folder.",
            free_on_resume=True,
        ),
        "download": Key(
            True,
            boolean(),
            "Download the CIFAR archive into Paddle's cache when the file is missing.",
            free_on_resume=True,
        ),
        "train_dir": Key(
            None,
            or_null(path()),
            "`folder`: the training images, one sub-folder per class (ImageNet: `.../train`); the sorted "
            "sub-folder names are the classes.",
            free_on_resume=True,
        ),
        "test_dir": Key(
            None,
            or_null(path()),
            "`folder`: the test images, sub-folders named like the training classes (ImageNet: `.../val`).",
            free_on_resume=True,
        ),
        "root": Key(
            None,
            or_null(path()),
            "`filelist`: the folder the paths in the lists are relative to (PaddleClas `image_root`).",
            free_on_resume=True,
        ),
        "train_list": Key(
            None,
            or_null(path()),
            "`filelist`: the training list, one `relative/path label` per line (PaddleClas `cls_label_path`).",
            free_on_resume=True,
        ),
        "test_list": Key(None, or_null(path()), "`filelist`: the test list, in the same format.", free_on_resume=True),
        "class_names_file": Key(
            None,
            or_null(path()),
            "`filelist`: optional class names, one `id name` per line (PaddleClas `class_id_map_file`); "
            "null names the classes by their ids.",
            free_on_resume=True,
        ),
        "crop_scale": Key(
            [0.05, 1.0], scale_range(), "Area range of the training RandomResizedCrop, as fractions of the image."
        ),
        "num_workers": Key(
            2,
            integer(0, maximum=64),
            "Data-loading worker processes per rank (0 loads in the training process).",
            free_on_resume=True,
        ),
        "val_size": Key(
            0,
            integer(0),
            "Training images held out (class-balanced, fixed by the seed) for model selection; "
            "0 selects on the test set, as the public code does.",
        ),
        "device_augment": Key(
            False,
            boolean(),
            "Crop, resize and normalise batched on the device from uint8 images; the host "
            "only gathers 3 KB per image (use on GPUs).",
        ),
    },
    "optimizer": {
        "name": Key("momentum", one_of("momentum", "adamw"), "SGD with momentum, or AdamW."),
        "lr": Key(8e-3, number(0, minimum_inclusive=False), "Peak learning rate, reached at the end of warmup."),
        "momentum": Key(0.9, number(0, 1), "Momentum of SGD (`momentum` only)."),
        "weight_decay": Key(0.0, number(0), "Weight decay (decoupled for AdamW, L2 for momentum)."),
        "grad_clip": Key(
            1.0,
            or_null(number(0, minimum_inclusive=False)),
            "Clip gradients to this global norm; null disables clipping.",
        ),
    },
    "schedule": {
        "name": Key(
            "warmup_cosine",
            one_of("warmup_cosine", "warmup_linear", "constant"),
            "Linear warmup then cosine or linear decay to 0; `constant` keeps the peak after warmup.",
        ),
        "warmup_steps": Key(500, integer(0), "Optimizer steps of linear warmup from 0 to `optimizer.lr`."),
        "total_steps": Key(20000, integer(1), "Optimizer steps of the whole run."),
    },
    "train": {
        "global_batch_size": Key(512, integer(1), "Images per optimizer step over all devices, whatever their number."),
        "micro_batch_size": Key(
            32,
            integer(1),
            "Images per device per forward; gradients are accumulated over global / (micro x devices) micro-steps.",
        ),
        "amp": Key(
            "none",
            one_of("none", "bf16", "fp16"),
            "Mixed precision on GPU with float32 master weights (fp16 adds dynamic loss scaling).",
        ),
        "seed": Key(0, integer(0), "Seeds initialisation, dropout, data order and augmentation."),
        "eval_every": Key(
            1000, integer(0), "Evaluate every N optimizer steps (0: only at the end).", free_on_resume=True
        ),
        "save_every": Key(
            1000, integer(0), "Save a resumable checkpoint every N steps (0: only at the end).", free_on_resume=True
        ),
        "log_every": Key(50, integer(1), "Print and log training metrics every N steps.", free_on_resume=True),
        "output_dir": Key(
            "output/run", path(), "Folder for config, logs, checkpoints and best weights.", free_on_resume=True
        ),
        "resume": Key(
            None,
            or_null(path()),
            "`auto` continues from the newest complete checkpoint in output_dir (starts fresh "
            "if there is none); a path resumes from that checkpoint.",
            free_on_resume=True,
        ),
        "resume_changes": Key(
            [],
            config_keys(),
            "Keys allowed to differ from the resumed checkpoint's config although they change what "
            "is trained (seed, batch sizes, data, model, loss, optimizer, schedule, amp), e.g. "
            "[schedule.total_steps]; without them such a resume is refused. Logging, saving, "
            "evaluation, paths and speed settings may always change.",
            free_on_resume=True,
        ),
        "overwrite": Key(
            False,
            boolean(),
            "Let a new run start in an output_dir that holds another run's checkpoints or best weights, "
            "deleting them; the new run's VisualDL records replace that run's. Nothing else is deleted.",
            free_on_resume=True,
        ),
        "lock_output_dir": Key(
            True,
            boolean(),
            "Lock output_dir (flock on its .lock file) so that a second run on the same folder is refused. "
            "false only for a file system without flock (Lustre without flock, NFSv3 with nolock), when "
            "you make sure yourself that one run at a time uses the folder.",
            free_on_resume=True,
        ),
        "keep_checkpoints": Key(2, integer(1), "How many of the newest checkpoints to keep.", free_on_resume=True),
        "max_bad_steps": Key(
            20,
            integer(1),
            "Stop after this many consecutive steps with a non-finite loss or gradient.",
            free_on_resume=True,
        ),
        "recompute": Key(
            False,
            boolean(),
            "Recompute block activations in the backward pass: less memory, about a third more compute.",
            free_on_resume=True,
        ),
        "to_static": Key(
            False,
            boolean(),
            "Convert the model's forward to a static program (`paddle.jit.to_static`), which "
            "CUDA builds of Paddle with CINN compile and fuse; for GPUs (slower than eager "
            "on CPU, where the CPU kernels do not apply to it). Not with recompute.",
            free_on_resume=True,
        ),
        "cpu_threads": Key(
            None,
            integer(1, nullable=True, maximum=1024),
            "Math threads per process on CPU; null uses this node's cores divided by the "
            "processes the launcher started.",
            free_on_resume=True,
        ),
    },
    "eval": {
        "batch_size": Key(256, integer(1), "Images per device per evaluation batch.", free_on_resume=True),
    },
}


def defaults():
    return {
        section: {name: copy.deepcopy(key.default) for name, key in keys.items()} for section, keys in SCHEMA.items()
    }


def _read_yaml(path):
    try:
        with open(path, encoding="utf-8") as stream:
            content = _safe_load(stream)
    except FileNotFoundError:
        raise UserError(
            f"Config file '{path}' does not exist. Pass an existing YAML file with --config "
            f"(the files in configs/ are a good start)."
        ) from None
    except _Oversized as error:
        raise _too_large_error(f"config file '{path}'", str(error)) from None
    except yaml.constructor.ConstructorError as error:
        raise UserError(
            f"Config file '{path}' uses a YAML tag that would construct an object "
            f"({error.problem} {error.problem_mark}). Configs are plain data: write the value "
            f"as a number, string, list or mapping."
        ) from None
    except yaml.YAMLError as error:
        raise UserError(
            f"Config file '{path}' is not valid YAML: {error}. Fix the syntax at the position shown."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"Config file '{path}' cannot be read ({error}). Check the path and permissions.") from None
    if content is None:
        return {}
    check_size(content, f"config file '{path}'")
    if not isinstance(content, dict):
        raise UserError(
            f"Config file '{path}' must hold a mapping of sections (model:, data:, train:, ...), "
            f"not a {type(content).__name__}."
        )
    return content


def shown(value):
    """`value` for an error message: long strings, lists and nested values are cut with `...`."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist = 3, 6, 8
    short.maxstring = short.maxother = 80
    return short.repr(value)


def deep_merge(base, override):
    merged = copy.deepcopy(base)
    for name, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = deep_merge(merged[name], value)
        else:
            merged[name] = copy.deepcopy(value)
    return merged


def _load_with_bases(path, chain=()):
    path = os.path.abspath(path)
    if path in chain:
        cycle = " -> ".join(list(chain) + [path])
        raise UserError(f"Config files inherit from each other in a cycle ({cycle}). Remove one `_base_`.")
    if len(chain) > MAX_BASES:
        raise UserError(
            f"Config file '{chain[0]}' inherits through more than {MAX_BASES} `{BASE_KEY}` files in one chain "
            f"(up to '{path}'). Merge some of them."
        )
    content = _read_yaml(path)
    bases = content.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise UserError(f"`{BASE_KEY}` in '{path}' must be a file path or a list of file paths.")
    merged = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise UserError(
                f"Config file '{path}' inherits from '{base}' (`{BASE_KEY}`), but there is no file "
                f"'{base_path}'. `{BASE_KEY}` paths are relative to the file that names them; fix it there."
            )
        merged = deep_merge(merged, _load_with_bases(base_path, chain + (path,)))
    return deep_merge(merged, content)


def parse_override(text):
    """`section.key=value` -> ('section.key', parsed value); the value is parsed as YAML."""
    dotted, separator, raw_value = text.partition("=")
    if not separator or "." not in dotted:
        raise UserError(
            f"Override {shown(text)} is not of the form section.key=value (for example -o optimizer.lr=0.01)."
        )
    try:
        value = _safe_load(raw_value)
    except _Oversized as error:
        raise _too_large_error(f"the override of {shown(dotted.strip())}", str(error)) from None
    except yaml.YAMLError as error:
        raise UserError(
            f"The value in override {shown(text)} is not valid YAML ({error}). Quote strings and write lists as [a, b]."
        ) from None
    check_size(value, f"the override of {shown(dotted.strip())}")
    return dotted.strip(), value


def apply_overrides(config, overrides):
    config = copy.deepcopy(config)
    for text in overrides:
        dotted, value = parse_override(text)
        section, _, name = dotted.partition(".")
        if not isinstance(config.get(section), dict):
            config[section] = {}
        config[section][name] = value
    return config


def _closest(name, candidates, prefix=""):
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    if matches:
        return f" Did you mean '{prefix}{matches[0]}'?"
    return f" Valid names: {', '.join(prefix + candidate for candidate in candidates)}."


def validate(config, source="the config"):
    """Check every section and key of `config` against SCHEMA; return it with the defaults filled in."""
    check_size(config, source)
    for section, keys in config.items():
        if section not in SCHEMA:
            raise UserError(f"Unknown section {shown(section)} in {source}.{_closest(str(section), SCHEMA)}")
        if not isinstance(keys, dict):
            raise UserError(f"Section '{section}' in {source} must be a mapping of keys, got {shown(keys)}.")
        for name, value in keys.items():
            if name not in SCHEMA[section]:
                raise UserError(
                    f"Unknown key {shown(f'{section}.{name}')} in {source}."
                    f"{_closest(str(name), SCHEMA[section], prefix=section + '.')}"
                )
            allowed = SCHEMA[section][name].allowed
            if not allowed.accepts(value):
                raise UserError(
                    f"Invalid value {shown(value)} for '{section}.{name}' in {source}: it must be "
                    f"{allowed.description}."
                )
            keys[name] = allowed.normalize(value)
    return deep_merge(defaults(), config)


# The checkpoint holds this optimizer's state (momentum buffers or Adam moments), which no other can use.
_FIXED_ON_RESUME = ("optimizer.name",)


def changes_on_resume(saved, current, checkpoint):
    """The differences of `current` from `saved` (the config stored in `checkpoint`), as "key: old -> new"
    lines; raises a UserError for any that makes the resumed run something other than a continuation
    unless train.resume_changes names it. `saved` is None for checkpoints that stored no config."""
    if not isinstance(saved, dict):
        return []
    check_size(saved, f"the config in checkpoint '{checkpoint}'")
    changes, refused = [], []
    for section, keys in SCHEMA.items():
        saved_section = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for name, key in keys.items():
            dotted = f"{section}.{name}"
            old, new = saved_section.get(name, key.default), current[section][name]
            if old == new:
                continue
            changes.append(f"{dotted}: {shown(old)} -> {shown(new)}")
            consented = dotted in current["train"]["resume_changes"] and dotted not in _FIXED_ON_RESUME
            if not (key.free_on_resume or consented):
                refused.append(dotted)
    if any(dotted in _FIXED_ON_RESUME for dotted in refused):
        raise UserError(
            f"Cannot resume from '{checkpoint}' with another {', '.join(_FIXED_ON_RESUME)} "
            f"({'; '.join(changes)}): the checkpoint holds the state of the optimizer it was "
            f"trained with. Resume with the checkpoint's optimizer, or start a new run from its "
            f"weights with model.pretrained: {checkpoint}."
        )
    if refused:
        raise UserError(
            f"Resuming from '{checkpoint}' would change what is trained, so the result would not be "
            f"the run that checkpoint belongs to ({'; '.join(changes)}). Use the checkpoint's values, "
            f"or, if the change is intended, say so with -o train.resume_changes=[{','.join(refused)}]."
        )
    return changes


def run_definition(cfg):
    """{"section.key": value} of the keys that define the run (`Key.defines_run`), in config order."""
    return {
        f"{section}.{name}": cfg[section][name]
        for section, keys in SCHEMA.items()
        for name, key in keys.items()
        if key.defines_run
    }


def load(path, overrides=()):
    """Read `path` (with its bases), apply `-o` overrides, validate and fill in the defaults."""
    config = apply_overrides(_load_with_bases(path), overrides)
    return validate(config, source=f"'{path}' with its overrides" if overrides else f"'{path}'")


def save(config, path):
    """Write `config` to `path` whole or not at all."""
    try:
        with atomic.replacing(path) as partial, open(partial, "w", encoding="utf-8") as stream:
            yaml.safe_dump(config, stream, sort_keys=False, default_flow_style=None)
    except OSError as error:
        raise UserError(
            f"Cannot write the run's config to '{path}' ({error.strerror or error}). Make "
            f"train.output_dir writable, free disk space, or choose another train.output_dir."
        ) from None


def _as_yaml(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


SECTIONS_HELP = (
    f"config sections: {', '.join(SCHEMA)}.\nEvery key, its default, allowed values and meaning: "
    f"docs/configuration.md\n(the same table: python -m rdrop.config)."
)


def add_arguments(parser, config_help, required=False, default=None):
    """`-c/--config` (PaddleClas users type -c) and `-o section.key=value`, as every entry point spells them."""
    parser.add_argument("-c", "--config", required=required, default=default, help=config_help)
    parser.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key; the value is parsed as YAML; repeatable",
    )
    parser.epilog = SECTIONS_HELP


def reference_table():
    """docs/configuration.md's table of every key, generated from SCHEMA so the two never disagree."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            rows.append(f"| `{section}.{name}` | `{_as_yaml(key.default)}` | {key.allowed.description} | {key.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description="Print the Markdown table of every config key (default, allowed values, meaning) that "
        "docs/configuration.md holds: python -m rdrop.config > table.md"
    ).parse_args()
    print(reference_table())
