"""The engine kit: :class:`EngineKit` and :func:`check_engine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ...contract.errors import EngineError, LoadstoneError, WeightsMismatchError
from ...contract.placement import map_entry
from ...contract.units import device_label, normalize_device
from ..checkpoints import ARCHITECTURES
from .backend import compare_tensors
from .report import CheckResult, ConformanceReport, Kit

ENGINE_CHECKS = {
    "listing": "a fresh `loadstone plugins --json` lists the engine from its distribution without importing a "
               "heavy library",
    "attribution": "engine=NAME is reported as the engine decision with the plugin and distribution",
    "equal_to_reference": "every tiny architecture in bfloat16 and float32 loads bit for bit what the reference "
                          "engine (transformers) loads, buffers included",
    "invariants": "nothing left on meta, every tensor on its planned device and dtype, tied weights one tensor, "
                  "the base frozen and in eval mode",
    "refusals": "a plan it cannot run (disk offload, pickle weights) is refused at plan time with an EngineError "
                "naming the engine and its reason; a plan it accepts loads what the reference loads",
    "missing_tensor": "a checkpoint missing a tensor is a WeightsMismatchError, never a randomly initialised one",
}


class EngineKit(Kit):
    """Checks an engine on every tiny architecture.

    :param engine: the engine's name (``engine=`` in ``load``).
    :param reference: the engine whose results count as right (default ``"transformers"``,
        i.e. ``from_pretrained``).
    :param architectures: default: every architecture of :data:`loadstone.testing.ARCHITECTURES`.
    :param dtypes: checkpoint dtypes, each loaded in its own dtype.
    """

    kind = "engine"
    checks = ENGINE_CHECKS

    def __init__(self, engine: str, *, reference: str = "transformers", architectures: Iterable[str] = tuple(ARCHITECTURES),
                 dtypes: Iterable[str] = ("bfloat16", "float32"), **kwargs: Any):
        self.engine = engine
        self.reference = reference
        self.architectures = tuple(architectures)
        self.dtypes = tuple(dtypes)
        self._references: dict[tuple[str, str], tuple[dict[str, Any], set[str]]] = {}
        super().__init__(**kwargs)

    def _find(self) -> Any:
        return self.plugins.engine(self.engine)

    def load(self, reference: Any, engine: str | None = None, **kwargs: Any) -> Any:
        import loadstone

        kwargs.setdefault("placement", "cpu")
        return loadstone.load(str(reference), engine=engine or self.engine, plugins=self.plugins, progress=False,
                              trainable=False, **kwargs)

    def plan(self, reference: Any, engine: str | None = None, **kwargs: Any) -> Any:
        import loadstone

        kwargs.setdefault("placement", "cpu")
        return loadstone.plan(str(reference), engine=engine or self.engine, plugins=self.plugins, trainable=False,
                              **kwargs)

    def _reference_tensors(self, folder: Path, key: tuple[str, str], *, persistent: bool = False) -> dict[str, Any]:
        """The reference engine's tensors of ``folder`` (``persistent``: the state dict's only,
        without non-persistent buffers, as accelerate serves an offloaded model's)."""
        if key not in self._references:
            model = self.load(folder, engine=self.reference).model
            self._references[key] = (state_of(model), set(model.state_dict()))
        tensors, saved = self._references[key]
        return {k: v for k, v in tensors.items() if k in saved} if persistent else tensors

    # -- checks ----------------------------------------------------------------------------
    def check_attribution(self, result: CheckResult) -> None:
        plan = self.plan(self.checkpoint(self.architectures[0]))
        for problem in self.owner_problems(plan.report.decision("engine"), "engine"):
            result.expect(False, problem)
        section = plan.report.engine
        result.expect(section.get("name") == self.engine and section.get("requested") == self.engine,
                      f"the report's engine section says {section}")
        result.record("engine", section)

    def check_equal_to_reference(self, result: CheckResult) -> None:
        if self.engine == self.reference:
            result.skip(f"{self.engine!r} is the reference engine")
            return
        compared = 0
        for arch in self.architectures:
            for dtype in self.dtypes:
                folder = self.checkpoint(arch, dtype=dtype)
                ours = state_of(self.load(folder).model)
                theirs = self._reference_tensors(folder, (arch, dtype))
                for problem in compare_tensors(ours, theirs)[:6]:
                    result.expect(False, f"{arch} {dtype}: {self.engine} vs {self.reference}: {problem}")
                compared += 1
        result.record("models_compared", compared)

    def check_invariants(self, result: CheckResult) -> None:
        for arch in self.architectures:
            loaded = self.load(self.checkpoint(arch))
            for problem in invariant_problems(loaded.model, loaded.plan)[:6]:
                result.expect(False, f"{arch}: {problem}")

    def check_refusals(self, result: CheckResult) -> None:
        cases = {"disk offload": self._disk_case(), "pickle weights": self._pickle_case()}
        outcome: dict[str, Any] = {}
        for what, (folder, kwargs) in cases.items():
            problems = self.plan(folder, engine="auto", **kwargs).engine_problems.get(self.engine, [])
            if problems:
                outcome[what] = {"refused": problems}
                try:
                    self.plan(folder, **kwargs)
                except EngineError as exc:
                    result.expect(repr(self.engine) in exc.message and problems[0] in exc.message,
                                  f"{what}: the EngineError does not name the engine and its reason: {exc.message}")
                    result.expect(exc.fix, f"{what}: the EngineError has no fix")
                except LoadstoneError as exc:
                    result.expect(False, f"{what}: expected EngineError, got {type(exc).__name__}: {exc}")
                else:
                    result.expect(False, f"{what}: problems() names {problems}, yet engine={self.engine!r} planned")
                continue
            outcome[what] = "accepted"
            loaded = self.load(folder, **kwargs)
            # Compared with the reference's load of the same weights from safetensors, all in memory:
            # the reference need not support disk offload or pickle itself.
            served = offloaded_state(loaded.model)
            offloaded = any(p.device.type == "meta" for p in loaded.model.parameters())
            reference = self._reference_tensors(self.checkpoint("llama"), ("llama", "default"), persistent=offloaded)
            for problem in compare_tensors(served, reference)[:6]:
                result.expect(False, f"{what}: {self.engine} vs {self.reference}: {problem}")
        result.record("cases", outcome)

    def _disk_case(self) -> tuple[Path, dict[str, Any]]:
        import loadstone

        folder = self.checkpoint("llama")
        total = loadstone.plan(str(folder), placement="cpu", plugins=self.plugins).bytes_per_device["cpu"]
        offload = self.workdir / f"offload-{self.engine}"
        offload.mkdir(exist_ok=True)
        return folder, {"placement": "sequential", "max_memory": {"cpu": int(total * 0.6)},
                        "offload_folder": str(offload)}

    def _pickle_case(self) -> tuple[Path, dict[str, Any]]:
        folder = self.workdir / "ckpt-llama-pickle"
        if not (folder / "pytorch_model.bin").is_file():
            import torch
            from safetensors.torch import load_file

            source = self.checkpoint("llama")
            folder.mkdir(exist_ok=True)
            (folder / "config.json").write_bytes((source / "config.json").read_bytes())
            torch.save(load_file(str(source / "model.safetensors")), folder / "pytorch_model.bin")
        return folder, {"allow_pickle": True}

    def check_missing_tensor(self, result: CheckResult) -> None:
        folder = self.workdir / "ckpt-llama-missing-norm"
        if not (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file, save_file

            source = self.checkpoint("llama")
            folder.mkdir(exist_ok=True)
            (folder / "config.json").write_bytes((source / "config.json").read_bytes())
            tensors = load_file(str(source / "model.safetensors"))
            del tensors["model.norm.weight"]
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        try:
            self.load(folder)
        except WeightsMismatchError as exc:
            result.expect("model.norm.weight" in str(exc), f"the error does not name the missing tensor: {exc}")
            result.record("error", exc.message)
        except Exception as exc:
            result.expect(False, f"expected WeightsMismatchError, got {type(exc).__name__}: {exc}")
        else:
            result.expect(False, "a checkpoint without model.norm.weight loaded without error")


def state_of(model: Any) -> dict[str, Any]:
    """Parameters and buffers (non-persistent ones included) by name."""
    return dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])


def offloaded_state(model: Any) -> dict[str, Any]:
    """The tensors a model serves, disk- and CPU-offloaded ones included (accelerate's view)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        return dict(get_state_dict_offloaded_model(model))
    return state_of(model)


def invariant_problems(model: Any, plan: Any) -> list[str]:
    """The kernel's invariants, checked independently of the kernel's own check."""
    problems = []
    dtypes = plan.tensor_map.dtypes if plan.tensor_map is not None else {}
    for name, tensor in state_of(model).items():
        if tensor.device.type == "meta":
            problems.append(f"{name} is on the meta device")
            continue
        key = map_entry(name, plan.device_map)
        if key is None:
            problems.append(f"{name} is not placed by the plan's device map")
        elif plan.device_map[key] != "disk":
            planned = device_label(normalize_device(plan.device_map[key]))
            actual = device_label(normalize_device(str(tensor.device)))
            if planned != actual:
                problems.append(f"{name} is on {actual}, planned {planned}")
        wanted = dtypes.get(name)
        if wanted and str(tensor.dtype).replace("torch.", "") != wanted:
            problems.append(f"{name} is {tensor.dtype}, planned {wanted}")
        if getattr(tensor, "requires_grad", False):
            problems.append(f"{name} requires grad although the base is frozen (trainable=False)")
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        try:
            a, b = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if a.data_ptr() != b.data_ptr():
            problems.append(f"tied weights {target} and {source} are two tensors")
    if model.training:
        problems.append("the model is in training mode after a trainable=False load")
    return problems


def check_engine(engine: str, *, only: Iterable[str] | None = None, skip: Iterable[str] = (),
                 **kwargs: Any) -> ConformanceReport:
    """Run the engine checks (:data:`ENGINE_CHECKS`) for the engine registered as ``engine``; the
    keyword arguments are :class:`EngineKit`'s (``plugins``, ``distribution``, ``reference``,
    ``architectures``, ``dtypes``, ``heavy_modules``, ``workdir``)."""
    return EngineKit(engine, **kwargs).run(only=only, skip=skip)
