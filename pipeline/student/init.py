"""`--init-from-teacher`: a student of the teacher's family and width whose layers are the teacher's.

DistilBERT's recipe: take every other layer of the teacher (plus its embeddings, final norm and
heads) as the starting point of a student with half the depth. Specs:
  every_other     teacher layers 0, 2, 4, ...
  first:N         teacher layers 0 .. N-1
  layers:A,B,...  those teacher layers, in that order (0 = the first block)
Layers are found by their index in the parameter names (`encoder.layer.{i}.` in BERT, `h.{i}.` in
GPT-2, `layers.{i}.` in Llama-style models); every other weight is copied as it is.
"""

from __future__ import annotations

import copy
import re

from pipeline.errors import KdcacheError

_LAYER = re.compile(r"\.(layer|h|layers)\.(\d+)\.")


def parse_layers(spec: str, teacher_layers: int) -> list[int]:
    """The teacher layers `spec` names, checked against the teacher's depth."""
    if spec == "every_other":
        chosen = list(range(0, teacher_layers, 2))
    elif spec.startswith("first:") and spec[6:].isdigit():
        chosen = list(range(int(spec[6:])))
    elif spec.startswith("layers:") and all(p.strip().isdigit() for p in spec[7:].split(",")):
        chosen = [int(p) for p in spec[7:].split(",")]
    else:
        raise KdcacheError(f"--init-from-teacher {spec!r} is not every_other, first:N or layers:A,B,... "
                           f"(e.g. layers:0,2,4).")
    bad = [layer for layer in chosen if layer >= teacher_layers]
    if not chosen or bad:
        raise KdcacheError(f"--init-from-teacher {spec!r} names teacher layers {bad or chosen} but the teacher has "
                           f"layers 0..{teacher_layers - 1}; choose layers in that range.")
    return chosen


def init_from_teacher(teacher, spec: str):
    """A new model of the teacher's class and config with len(chosen) layers, weights copied from it."""
    layers = parse_layers(spec, int(teacher.config.num_hidden_layers))
    found = {int(m.group(2)) for name in teacher.state_dict() for m in [_LAYER.search(name)] if m}
    if not found:
        raise KdcacheError(f"--init-from-teacher: cannot find the layers of a {type(teacher).__name__} (no "
                           f"`layer.N.`, `h.N.` or `layers.N.` parameters); use a BERT- or GPT-style teacher "
                           f"or drop --init-from-teacher.")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config)
    source = teacher.state_dict()
    student_state = {}
    for name in student.state_dict():
        match = _LAYER.search(name)
        teacher_name = name if match is None else (
            name[:match.start()] + f".{match.group(1)}.{layers[int(match.group(2))]}." + name[match.end():])
        student_state[name] = source[teacher_name].clone()
    student.load_state_dict(student_state)
    return student

