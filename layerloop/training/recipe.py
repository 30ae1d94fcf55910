"""The BFS training recipe: ``layerloop train RECIPE`` runs ``rgba-vae -> phi -> stage1 -> stage2`` in one command.

A recipe config is a training config without ``stage`` plus a ``recipe:`` list; the top-level keys are
shared by every stage, and each entry names its ``stage`` and overrides what that stage does differently
(mappings such as ``task`` merge key by key, anything else, ``data`` included, is replaced)::

    name: bfs-recipe-demo
    family: bfs
    model: tiny
    data: [{name: demo, run_dir: runs/demo}]
    task: {resolution: 32}
    recipe:
      - {stage: rgba-vae, steps: 150, lr: 1.0e-3}
      - {stage: phi, steps: 300, lr: 3.0e-3}
      - {stage: stage1, steps: 60, lr: 1.0e-3}
      - {stage: stage2, steps: 40, data: [...quadruples and pairs...]}

Each stage is an ordinary ``TrainConfig`` (named ``<name>-<stage>``) trained into ``OUT/<stage>/``, wired to
the earlier stages' ``final/``: Phi gets ``task.rgba_vae_checkpoint`` (it is trained in that VAE's latent
space), stage 1 that and ``task.phi_checkpoint``, stage 2 both plus ``task.init_lora`` (stage 1). A stage
left out of the recipe is not wired: give its checkpoint yourself (``task.phi_checkpoint=...``); a key the
recipe wires may not be set by hand.

Order: the stages must be listed in the order they run (a subset is fine). A list out of order is refused,
not reordered: the order as written is what a reader takes for the order of execution, and a list written
in another order (the old ``train_bfs.yaml`` named Phi before the RGBA VAE it depends on) usually means
the author assumed another dependency; saying so costs one edit, silently reordering hides it.

Re-running: a stage whose ``final/`` is there with its ``checkpoint_hash.txt`` and whose ``summary.json``
reached the configured steps is skipped; an interrupted one resumes from its newest checkpoint (the
loop's resume); a stage whose config changed is refused by its own ``train.json``. A finished or
interrupted stage whose parents changed since (an earlier stage retrained) is refused, naming both hashes.

Overrides: ``recipe.stage1.steps=10`` (entries by stage), shared keys as in a training config
(``data.demo.run_dir=...``; a stage that sets the key itself keeps its own).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, create_model, model_validator

from layerloop.config import ConfigModel, fingerprint_of, validate_model
from layerloop.errors import ConfigError
from layerloop.files import write_atomic
from layerloop.models.checkpoints import HASH_FILE
from layerloop.training.config import TrainConfig

logger = logging.getLogger(__name__)

ORDER = ("rgba-vae", "phi", "stage1", "stage2")
# stage -> {task key the recipe sets: the earlier stage whose final/ it names}
WIRING: dict[str, dict[str, str]] = {
    "rgba-vae": {},
    "phi": {"rgba_vae_checkpoint": "rgba-vae"},
    "stage1": {"rgba_vae_checkpoint": "rgba-vae", "phi_checkpoint": "phi"},
    "stage2": {"rgba_vae_checkpoint": "rgba-vae", "phi_checkpoint": "phi", "init_lora": "stage1"},
}
STAGE_ONLY = ("stage", "out")  # keys a recipe's shared section may not have
RECIPE_FILE = "recipe.json"


def _shared_fields() -> dict[str, Any]:
    """Every TrainConfig key but ``stage`` and ``name`` / ``out`` (the recipe's own), optional: a key may be
    given once for all stages or by each stage. Each stage's merged config is validated as a TrainConfig."""
    fields: dict[str, Any] = {}
    for name, info in TrainConfig.model_fields.items():
        if name in STAGE_ONLY or name == "name":
            continue
        fields[name] = (Optional[info.annotation], None)
    fields["family"] = (Literal["bfs"], "bfs")
    return fields


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _RecipeBase(ConfigModel):
    config_label: ClassVar[str] = "a training recipe"
    FINGERPRINT_EXCLUDE: ClassVar[tuple[str, ...]] = ("out",)

    name: str = "bfs-recipe"
    recipe: list[dict[str, Any]] = Field(min_length=1)
    out: str | None = None

    @model_validator(mode="after")
    def _stages_in_order(self):
        listed = [entry.get("stage") for entry in self.recipe]
        unknown = [s for s in listed if s not in ORDER]
        if unknown:
            raise ValueError(f"recipe: {', '.join(map(repr, unknown))} is not a BFS stage; each entry needs "
                             f"`stage:` one of {', '.join(ORDER)}")
        if len(set(listed)) != len(listed):
            raise ValueError(f"recipe: a stage is listed twice ({', '.join(listed)}); each stage runs once")
        expected = [s for s in ORDER if s in listed]
        if listed != expected:
            raise ValueError(f"recipe: the stages run in the order {' -> '.join(ORDER)}, each on the ones before; "
                             f"this recipe lists {', '.join(listed)}. List them as {', '.join(expected)} (the "
                             f"recipe is not reordered for you: the order written is the order read)")
        for entry in self.recipe:
            for key in ("out", "family"):
                if key in entry:
                    raise ValueError(f"recipe.{entry['stage']}.{key}: set by the recipe (each stage trains the BFS "
                                     f"family into OUT/<stage>/); remove it")
        try:
            self.stage_configs()  # every stage validates as a TrainConfig, before anything runs
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return self

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[str]:
        return [entry["stage"] for entry in self.recipe]

    def _shared(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_unset=True, exclude={"name", "recipe", "out"})
        data["family"] = "bfs"
        return data

    def stage_configs(self, out: str | Path | None = None) -> list[tuple[str, TrainConfig]]:
        """(stage, TrainConfig) in order; with ``out``, wired to the earlier stages' ``OUT/<stage>/final``
        (without, as written: what the recipe's fingerprint covers)."""
        shared, listed = self._shared(), set(self.stages())
        configs = []
        for entry in self.recipe:
            stage = entry["stage"]
            data = _merge(shared, entry)
            data.setdefault("name", f"{self.name}-{stage}")
            task = dict(data.get("task") or {})
            for key, producer in WIRING[stage].items():
                if producer not in listed:
                    continue
                if key in task:
                    raise ValueError(f"recipe.{stage}.task.{key}: set by the recipe (the final/ of its {producer} "
                                     f"stage); remove it, or drop {producer} from the recipe to give your own")
                if out is not None:
                    task[key] = str(Path(out) / producer / "final")
            data["task"] = task
            configs.append((stage, validate_model(TrainConfig, data, title=f"recipe stage {stage}")))
        return configs

    def fingerprint(self) -> str:
        """Of the stages' own fingerprints as written (so what a stage may change on resume, such as
        ``steps``, does not change it either)."""
        return fingerprint_of({"name": self.name,
                               "stages": [[stage, cfg.fingerprint()] for stage, cfg in self.stage_configs()]})

    def out_dir(self, out: str | Path | None = None) -> Path:
        return Path(out or self.out or Path("runs") / self.name)


RecipeConfig = create_model("RecipeConfig", __base__=_RecipeBase, **_shared_fields())
RecipeConfig.__doc__ = __doc__


def is_recipe(data: dict[str, Any]) -> bool:
    return isinstance(data, dict) and "recipe" in data


def load_recipe_config(config: str | Path | dict[str, Any], overrides: list[str] | None = None):
    return RecipeConfig.load(config, overrides)


# --------------------------------------------------------------------------- running
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished(cfg: TrainConfig, stage_out: Path) -> bool:
    """final/ with its hash, from this config, at the configured steps."""
    final = stage_out / "final"
    summary = _read_json(stage_out / "summary.json") or {}
    record = _read_json(stage_out / "train.json") or {}
    return ((final / HASH_FILE).is_file() and record.get("fingerprint") == cfg.fingerprint()
            and summary.get("step") == cfg.steps and summary.get("checkpoint_hash") == (final / HASH_FILE).read_text().strip())


def _check_current(stage: str, cfg: TrainConfig, stage_out: Path) -> None:
    """A stage already (partly) trained on other parents than the recipe's current ones is refused."""
    from layerloop.training import checkpoint as ckpt
    from layerloop.training.bfs_lineage import PARENT_KINDS, parent_hashes, read_parents
    from layerloop.training.bfs_task import BFSParams

    latest = ckpt.latest_checkpoint(stage_out)
    folder = stage_out / "final" if (stage_out / "final" / HASH_FILE).is_file() else (
        latest / ckpt.WEIGHTS if latest is not None else None)
    recorded = read_parents(folder) if folder is not None else None
    if not recorded:
        return
    current = parent_hashes(stage, BFSParams(**cfg.task))
    for key, entry in current.items():
        theirs = recorded.get(key)
        if theirs is not None and theirs.get("hash") != entry.get("hash"):
            raise ValueError(f"recipe stage {stage}: {folder} was trained on {PARENT_KINDS[key][0]} "
                             f"{theirs.get('hash')}, but {entry.get('path')} is now {entry.get('hash')} (an earlier "
                             f"stage was retrained). Delete {stage_out} to retrain {stage} on it.")


def run_recipe(cfg, out: str | Path | None = None, stop_at: dict[str, int] | None = None) -> dict[str, Any]:
    """Run the recipe's stages in order into ``OUT/<stage>/``; skip finished ones, resume an interrupted one.
    ``stop_at`` ({stage: step}) stops that stage after the step as an interruption would (tests, time
    slices); the stages after it do not run. Returns {"out_dir", "stopped", "stages": {stage: summary}}."""
    from layerloop import logs
    from layerloop.training import run_training

    out_dir = cfg.out_dir(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = cfg.stage_configs(out_dir)
    write_atomic(out_dir / RECIPE_FILE, json.dumps({
        "config": cfg.model_dump(mode="json"), "fingerprint": cfg.fingerprint(),
        "stages": {stage: {"out": str(out_dir / stage), "fingerprint": c.fingerprint()} for stage, c in configs},
    }, indent=2, sort_keys=True) + "\n")
    result: dict[str, Any] = {"out_dir": str(out_dir), "stopped": False, "stages": {}}
    for stage, stage_cfg in configs:
        stage_out = out_dir / stage
        _check_current(stage, stage_cfg, stage_out)
        if _finished(stage_cfg, stage_out):
            summary = _read_json(stage_out / "summary.json") or {}
            logs.status(f"recipe {cfg.name}: {stage} already trained ({stage_out / 'final'}); skipped")
            result["stages"][stage] = {**summary, "skipped": True}
            continue
        logs.status(f"recipe {cfg.name}: {stage} -> {stage_out}")
        summary = run_training(stage_cfg, stage_out, stop_at=(stop_at or {}).get(stage))
        result["stages"][stage] = {**summary, "skipped": False}
        if summary.get("stopped"):
            result["stopped"] = True
            break
    return result
