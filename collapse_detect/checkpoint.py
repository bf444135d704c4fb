"""Resolve and load a fine-tuned checkpoint offline and without executing code from it.

Safety rules, because checkpoints in CI are untrusted input:
- never touch the network (``local_files_only=True`` and ``HF_HUB_OFFLINE``);
- never run code shipped with the checkpoint (``trust_remote_code=False``);
- load safetensors only, unless ``allow_pickle`` is set; even then ``weights_only=True``;
- read a pickled ``training_args.bin`` (with ``allow_pickle``) without importing or calling what it names
  (``read_saved_object``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, UnsafeCheckpointError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
GENERIC_LABEL = re.compile(r"^LABEL_\d+$")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class ResolvedCheckpoint:
    """Where the weights are and why that folder was chosen (no folder: a model passed to diagnose())."""

    path: Path | None
    requested: Path | None
    reason: str
    trainer_state: dict | None = None
    trainer_state_path: Path | None = None


@dataclass
class LoadedCheckpoint:
    model: object
    tokenizer: object
    class_names: list[str]
    generic_label_names: bool
    resolved: ResolvedCheckpoint
    weights_file: str | None
    notes: list[str] = field(default_factory=list)
    # parameters the checkpoint did not contain and transformers initialised at random (an untrained head)
    missing_keys: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def resolve_checkpoint(model_dir: str | os.PathLike) -> ResolvedCheckpoint:
    """Find the folder holding the weights.

    ``model_dir`` is either a saved model (``config.json`` inside) or a ``Trainer`` output folder with
    ``checkpoint-*`` subfolders; then the best checkpoint named by ``trainer_state.json`` is used, else the
    latest by step number.
    """
    requested = Path(model_dir)
    if not requested.exists():
        raise CheckpointError(
            f"model directory {str(requested)!r} does not exist (collapse-detect loads local folders only; "
            "it never downloads from a model hub)"
        )
    if not requested.is_dir():
        raise CheckpointError(f"model directory {str(requested)!r} is a file; pass the folder that holds config.json")

    if (requested / "config.json").is_file():
        state_path = requested / "trainer_state.json"
        state = _read_json(state_path) if state_path.is_file() else None
        return ResolvedCheckpoint(requested, requested, "the folder holds config.json", state,
                                  state_path if state else None)

    steps = sorted(
        ((int(m.group(1)), p) for p in requested.iterdir()
         if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name)) and (p / "config.json").is_file()),
        key=lambda sp: sp[0],
    )
    if not steps:
        raise CheckpointError(
            f"model directory {str(requested)!r} has no config.json and no checkpoint-*/config.json; "
            "pass a folder written by save_pretrained() or a Trainer output_dir"
        )
    latest_step, latest = steps[-1]
    state_path = latest / "trainer_state.json"
    state = _read_json(state_path) if state_path.is_file() else None
    best = (state or {}).get("best_model_checkpoint")
    if best:
        best_name = Path(best).name
        for _, p in steps:
            if p.name == best_name:
                return ResolvedCheckpoint(p, requested, f"best checkpoint per trainer_state.json ({best_name})",
                                          state, state_path if state else None)
    return ResolvedCheckpoint(latest, requested, f"latest checkpoint by step ({latest.name})", state,
                              state_path if state else None)


# The files a tokenizer is loaded from (fast tokenizers, WordPiece, BPE, SentencePiece); one must be present.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "spm.model", "sentencepiece.model")


def _weights_file(path: Path, allow_pickle: bool) -> tuple[str, bool]:
    for name in SAFE_WEIGHTS:
        if (path / name).is_file():
            return name, True
    for name in PICKLE_WEIGHTS:
        if (path / name).is_file():
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{str(path)!r} holds only pickle weights ({name}); loading a pickle can run code. "
                    "Re-save the model with save_pretrained(safe_serialization=True), or pass --allow-pickle "
                    "to load it with torch.load(weights_only=True)"
                )
            return name, False
    raise CheckpointError(f"{str(path)!r} holds no weights (expected model.safetensors); pass the folder "
                          "written by save_pretrained()")


def load_checkpoint(model_dir: str | os.PathLike, *, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load model and tokenizer from a local folder, offline and without remote code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    resolved = resolve_checkpoint(model_dir)
    path = resolved.path
    config = _read_json(path / "config.json")
    if config is None:
        raise CheckpointError(f"{str(path / 'config.json')!r} is not valid JSON")
    if config.get("auto_map"):
        raise UnsafeCheckpointError(
            f"{str(path / 'config.json')!r} asks for custom code (auto_map); collapse-detect never runs code "
            "shipped with a checkpoint. Re-save the model with a built-in transformers architecture"
        )
    weights_file, safe = _weights_file(path, allow_pickle)

    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Without its files transformers may build an empty tokenizer from the config alone, every row turns into
    # unknown tokens, and the report would blame the model for a folder that lacks its tokenizer.
    # (tokenizer_config.json alone serves the byte-level tokenizers, which have no vocabulary file)
    if not any((path / name).is_file() for name in (*TOKENIZER_FILES, "tokenizer_config.json")):
        raise CheckpointError(f"{str(path)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save "
                              "the tokenizer into the model folder: tokenizer.save_pretrained(folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise CheckpointError(f"cannot load the tokenizer from {str(path)!r}: {_first_line(exc)}") from exc
    try:
        with warnings.catch_warnings():  # torch's note on a pickle's protocol is not for the user to act on
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # in fp32 whatever dtype the weights were saved in (transformers 5 keeps the saved one): the probe
            # computes in fp32 unless --dtype bf16 asks otherwise, and its drift is measured against fp32
            model, loading_info = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, trust_remote_code=False, use_safetensors=safe, weights_only=True,
                output_loading_info=True, dtype=torch.float32,
            )
    except Exception as exc:
        if not safe and "weights only load failed" in str(exc).lower():
            # torch's own message suggests weights_only=False, which would run the pickle's code
            raise UnsafeCheckpointError(
                f"{str(path / weights_file)!r} holds more than tensors, so torch's safe loader "
                "(weights_only=True) refused it; collapse-detect never loads it otherwise. Re-save the model "
                "with save_pretrained(safe_serialization=True) where it was trained") from exc
        raise CheckpointError(f"cannot load a sequence-classification model from {str(path)!r}: "
                              f"{_first_line(exc)}") from exc
    model.eval()
    from .gradnorm import find_head

    try:
        head = find_head(model)  # every later step reads the head's input; fail here, with the folder's name
    except ValueError as exc:
        raise CheckpointError(f"{str(path)!r}: cannot find the classification head: {_first_line(exc)}") from exc
    check_judgeable(model, head, repr(str(path)))
    num_labels = int(model.config.num_labels)
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    class_names = [id2label.get(i, f"LABEL_{i}") for i in range(num_labels)]
    generic = all(GENERIC_LABEL.match(n) for n in class_names)
    notes = []
    if generic:
        notes.append("id2label holds only generic names (LABEL_0, LABEL_1, ...): set id2label/label2id in "
                     "config.json so reports and downstream users see real class names")
    if resolved.path != resolved.requested:
        notes.append(f"checkpoint chosen: {resolved.path.name} ({resolved.reason})")
    missing = sorted(str(k) for k in (loading_info or {}).get("missing_keys", []) or [])
    if missing:
        notes.append(f"{len(missing)} parameter(s) were not in the checkpoint and were initialised at random: "
                     f"{', '.join(missing[:4])}")
    return LoadedCheckpoint(model, tokenizer, class_names, generic, resolved, weights_file, notes, missing)


def check_judgeable(model, head, where: str) -> None:
    """Refuse, before any probing, the models whose outputs collapse-detect cannot read as one softmax over the
    classes of each row: multi-label classifiers (a sigmoid per class), regression heads (one output) and
    classifiers that apply their head to every token and pick one token's logits afterwards (decoders such as
    GPT-2 or Llama: the head's input is then not one feature vector per row)."""
    import torch

    config = model.config
    problem = getattr(config, "problem_type", None)
    if problem == "multi_label_classification":
        raise CheckpointError(
            f"{where} is a multi-label classifier (problem_type 'multi_label_classification' in its config): each "
            "class has its own sigmoid; collapse-detect judges single-label classifiers, whose classes share one "
            "softmax")
    if problem == "regression":
        raise CheckpointError(f"{where} is a regression model (problem_type 'regression'); collapse-detect judges "
                              "classifiers with two or more classes")
    if int(getattr(config, "num_labels", 2)) < 2:
        raise CheckpointError(f"{where} has one output (a regression head, or a binary classifier with a single "
                              "sigmoid output); collapse-detect judges classifiers with one output per class, two "
                              "or more")
    seen: list[int] = []
    handle = head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].dim()))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
    except Exception:  # a model this input does not suit: the probe's own error tells more
        seen.clear()
    finally:
        handle.remove()
    if seen and seen[0] != 2:
        raise CheckpointError(
            f"{where}: its classification head reads every token and one token's logits are picked afterwards (a "
            "decoder classifier such as GPT-2 or Llama); collapse-detect judges classifiers whose head reads one "
            "pooled vector per row (BERT, RoBERTa, DistilBERT, DeBERTa, ELECTRA, ...)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


PICKLE_READ_LIMIT = 16 * 2**20  # bytes of pickle read from a saved object; training_args.bin holds a few KB


class _Named:
    """Stands in for whatever a pickle names (a class, an enum, a function): nothing is imported or called.
    Called or instantiated by the pickle, it only keeps the arguments and the state it was given."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        inst = object.__new__(cls)
        inst.args, inst.state = args, None
        return inst

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


NUMPY_SCALARS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
NUMERIC_DTYPES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")


def _numpy_scalar(dtype, data):
    """A numpy number as pickle stores it (a dtype and the value's bytes), decoded for numeric dtypes only: a
    learning rate from a sweep is often np.float64."""
    import numpy as np

    if (isinstance(data, _Named) and data.qualname == "_codecs.encode" and len(data.args) == 2
            and isinstance(data.args[0], str) and data.args[1] in ("latin1", "latin-1")):
        data = data.args[0].encode("latin-1")  # how pickle protocol 2 stores bytes
    if not (isinstance(dtype, _Named) and dtype.qualname == "numpy.dtype" and dtype.args
            and isinstance(dtype.args[0], str) and dtype.args[0] in NUMERIC_DTYPES and isinstance(data, bytes)):
        return "<numpy scalar>"
    state = dtype.state if isinstance(dtype.state, tuple) else ()
    order = state[1] if len(state) > 1 and state[1] in ("<", ">", "=", "|") else "="
    kind = np.dtype(dtype.args[0]).newbyteorder(order)
    if len(data) != kind.itemsize:
        return "<numpy scalar>"
    return np.frombuffer(data, dtype=kind)[0].item()


PLAIN_VALUE_LIMIT = 100_000  # values rebuilt from one saved object; training_args.bin has a few hundred


def _key(key) -> str:
    """A dict key as short text: str(bytes) of 16 MB, rebuilt for every reference to its dict, would be gigabytes."""
    if isinstance(key, str):
        return key
    if isinstance(key, (bool, float, type(None))):
        return str(key)
    if isinstance(key, int):
        return str(key) if abs(key) < 10**100 else "<integer key>"
    return f"<{type(key).__name__} key>"


def _plain(value, depth: int = 0, budget: list | None = None):
    """A stand-in as a plain value: an enum member as its value, an object as its state (a dict). A pickle can
    refer to one list many times over, so the values rebuilt are counted: past ``PLAIN_VALUE_LIMIT`` it is not a
    saved configuration (ValueError)."""
    budget = [PLAIN_VALUE_LIMIT] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"it expands to more than {PLAIN_VALUE_LIMIT} values, more than a saved configuration")
    if depth > 20:
        return None
    if isinstance(value, _Named):
        if value.qualname in NUMPY_SCALARS and len(value.args) == 2:
            return _numpy_scalar(*value.args)
        if isinstance(value.state, tuple) and value.state and isinstance(value.state[0], dict):
            value.state = value.state[0]  # (__dict__, __slots__) state
        if isinstance(value.state, dict):
            return {_key(k): _plain(v, depth + 1, budget) for k, v in value.state.items()}
        if len(value.args) == 1 and value.state is None and value.qualname.rsplit(".", 1)[-1][:1].isupper():
            return _plain(value.args[0], depth + 1, budget)  # a class called with one value: Enum(value) and such
        return f"<{value.qualname}>"
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1, budget) for v in value]
    if isinstance(value, dict):
        return {_key(k): _plain(v, depth + 1, budget) for k, v in value.items()}
    if isinstance(value, (str, int, float, type(None))):
        return value
    return f"<{type(value).__name__}>"  # bytes, sets: no field of a saved configuration


def read_saved_object(path: Path) -> object:
    """The fields of an object that ``torch.save`` pickled (such as Trainer's ``training_args.bin``), read without
    importing or running anything the file names: every class or function it refers to becomes a stand-in that
    only records its arguments and state, so a crafted file cannot execute code. Returns plain values (dicts,
    lists, str, numbers; an enum member as its value). Raises ValueError for a file in another format."""
    import io
    import pickle
    import zipfile

    def flat(key):  # hashing or comparing a nested tuple can take for ever or overflow the C stack
        if not isinstance(key, (str, bytes, int, float, type(None), _Named)):
            raise ValueError(f"a dict key or set member of type {type(key).__name__}")
        return key

    class Reader(pickle._Unpickler):  # the Python reader, so that keys can be checked before they are hashed
        dispatch = dict(pickle._Unpickler.dispatch)

        def find_class(self, module, name):
            return type(name, (_Named,), {"qualname": f"{module}.{name}"})

        def persistent_load(self, pid):  # tensor storages: not needed for the fields
            return None

        def load_setitem(self):
            value = self.stack.pop()
            key = flat(self.stack.pop())
            self.stack[-1][key] = value

        def load_setitems(self):
            items = self.pop_mark()
            target = self.stack[-1]
            for i in range(0, len(items), 2):
                target[flat(items[i])] = items[i + 1]

        def load_dict(self):
            items = self.pop_mark()
            self.append({flat(items[i]): items[i + 1] for i in range(0, len(items), 2)})

        def load_additems(self):
            items = self.pop_mark()
            target = self.stack[-1]
            if not isinstance(target, set):
                raise ValueError("ADDITEMS on something other than a set")
            target.update(flat(i) for i in items)

        def load_frozenset(self):
            self.append(frozenset(flat(i) for i in self.pop_mark()))

        dispatch[pickle.SETITEM[0]] = load_setitem
        dispatch[pickle.SETITEMS[0]] = load_setitems
        dispatch[pickle.DICT[0]] = load_dict
        dispatch[pickle.ADDITEMS[0]] = load_additems
        dispatch[pickle.FROZENSET[0]] = load_frozenset

    too_big = ValueError(f"its pickle is over {PICKLE_READ_LIMIT} bytes, more than a saved configuration")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith("/data.pkl") or m.filename == "data.pkl"]
            if len(members) != 1:
                raise ValueError("not a file written by torch.save (no data.pkl in the archive)")
            if members[0].file_size > PICKLE_READ_LIMIT:
                raise too_big
            with archive.open(members[0]) as member:  # read no more than the limit, whatever the header says
                data = member.read(PICKLE_READ_LIMIT + 1)
            if len(data) > PICKLE_READ_LIMIT:
                raise too_big
    except zipfile.BadZipFile:
        raise ValueError("not a zip archive as torch.save writes (an older or foreign format)") from None
    except ValueError:
        raise
    except Exception as exc:  # an encrypted member, an unknown compression method, corrupt data
        raise ValueError(f"unreadable archive ({type(exc).__name__}: {exc})"[:300]) from None
    try:
        return _plain(Reader(io.BytesIO(data)).load())
    except Exception as exc:  # whatever a malformed pickle makes the reader or the stand-ins raise
        raise ValueError(f"unreadable pickle ({type(exc).__name__}: {exc})"[:300]) from None
