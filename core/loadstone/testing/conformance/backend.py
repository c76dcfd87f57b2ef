"""The quantization backend kit: :class:`BackendKit` and :func:`check_backend`."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ...contract.errors import EngineError, LoadstoneError, OptionError, PluginHookError
from .conversions import ConversionMeter, sequential_transformers_loading
from .measure import AllocationPeak, reachable_tensors, stored_bytes
from .report import CheckResult, ConformanceReport, Kit
from .training import checkpointing_is_non_reentrant, train_one_step

BACKEND_CHECKS = {
    "listing": "a fresh `loadstone plugins --json` lists the backend from its distribution without importing "
               "a heavy library",
    "attribution": "the report's quantization and engine decisions name the plugin and distribution",
    "estimate": "the plan's bytes at rest are within the tolerance of what the loaded model holds",
    "peak": "each conversion holds no more at once than transient_bytes declared and keeps no copy of what it "
            "was handed; where the whole load is measurable, it peaks within the plan's peak_bytes_per_device",
    "lora_training": "LoRA wraps the backend's modules, and one training step gives gradients to, and changes, "
                     "the adapter weights only",
    "gradient_checkpointing": "with gradient_checkpointing=True the kernel's non-reentrant checkpointing is "
                              "active (layers are recomputed in the backward pass) and training works",
    "refusals": "options it does not take are an OptionError, engines it cannot run on refuse at plan time "
                "with an EngineError naming the engine and the reason",
    "engines_agree": "every engine that can run the backend loads the same tensors and quantization state, "
                     "bit for bit",
}

# Refusals every backend owes (the kit adds the backend's own through ``refusals=``): an option
# no backend takes.
_NO_SUCH_OPTION = "conformance_no_such_option"


class BackendKit(Kit):
    """Checks a quantization backend, asked for by one of its methods, on tiny checkpoints.

    :param method: a method the backend provides (``quantization=method``).
    :param options: ``quantization_options`` for every load (default: none).
    :param architectures: tiny architectures to load (see :data:`loadstone.testing.ARCHITECTURES`);
        the default covers a plain decoder (``nn.Linear``) and GPT-2 (``Conv1D``, tied embeddings).
    :param dtypes: checkpoint dtypes; each checkpoint loads in its own dtype.
    :param measure: ``model -> bytes`` for the estimate check (default :func:`stored_bytes`).
    :param tolerance: relative tolerance of the estimate and peak checks.
    :param engine: the engine of the estimate, peak and training checks (default ``"auto"``).
    :param placement: where every load goes (default ``"cpu"``; ``"cuda:0"`` on a GPU machine: the
        peak is then measured on that device).
    :param refusals: the backend's own refusals: ``(load keyword arguments, error class)`` pairs,
        each of which ``loadstone.plan`` must raise.
    """

    kind = "quantization"
    checks = BACKEND_CHECKS

    def __init__(self, method: str, *, options: dict[str, Any] | None = None,
                 architectures: Iterable[str] = ("llama", "gpt2"), dtypes: Iterable[str] = ("float32", "bfloat16"),
                 measure: Callable[[Any], int] | None = None, tolerance: float = 0.05, engine: str = "auto",
                 refusals: Iterable[tuple[dict[str, Any], type]] = (), placement: str = "cpu", **kwargs: Any):
        self.method = method
        self.options = dict(options or {})
        self.architectures = tuple(architectures)
        self.dtypes = tuple(dtypes)
        self.measure = measure or stored_bytes
        self.tolerance = tolerance
        self.engine = engine
        self.refusals = list(refusals)
        self.placement = placement
        super().__init__(**kwargs)

    def _find(self) -> Any:
        return self.plugins.quantization_backend(self.method)

    # -- loading -------------------------------------------------------------------------
    def _kwargs(self, **extra: Any) -> dict[str, Any]:
        base = {"quantization": self.method, "quantization_options": dict(self.options), "placement": self.placement,
                "engine": self.engine, "plugins": self.plugins}
        return {**base, **extra}

    def plan(self, reference: Any, **extra: Any) -> Any:
        import loadstone

        return loadstone.plan(str(reference), **self._kwargs(**extra))

    def load(self, reference: Any, **extra: Any) -> Any:
        import loadstone

        return loadstone.load(str(reference), progress=False, **self._kwargs(**extra))

    def cases(self) -> list[tuple[str, str]]:
        return [(arch, dtype) for arch in self.architectures for dtype in self.dtypes]

    # -- checks ----------------------------------------------------------------------------
    def check_attribution(self, result: CheckResult) -> None:
        plan = self.plan(self.checkpoint(self.architectures[0]))
        report = plan.report
        for problem in self.owner_problems(report.decision("quantization"), "quantization"):
            result.expect(False, problem)
        reg = self.registration
        section = {k: report.quantization.get(k) for k in ("backend", "plugin", "distribution", "version")}
        result.expect(section == {"backend": reg.name, "plugin": reg.plugin, "distribution": reg.distribution,
                                  "version": reg.version}, f"the report's quantization section says {section}")
        engine = report.decision("engine")
        result.expect(engine is not None and engine.plugin and engine.distribution,
                      f"the engine decision does not name its plugin and distribution: {engine}")
        result.record("decision", report.decision("quantization").to_dict())
        result.record("engine", engine.to_dict() if engine else None)

    def check_estimate(self, result: CheckResult) -> None:
        rows = []
        for arch, dtype in self.cases():
            folder = self.checkpoint(arch, dtype=dtype)
            for trainable in (False, True):
                plan = self.plan(folder, trainable=trainable)
                loaded = self.load(folder, trainable=trainable)
                estimate, real = sum(plan.bytes_per_device.values()), int(self.measure(loaded.model))
                error = (estimate - real) / real if real else float("inf")
                rows.append({"arch": arch, "dtype": dtype, "trainable": trainable, "estimate": estimate,
                             "measured": real, "error": round(error, 4),
                             "converted_tensors": len(plan.tensor_map.converted) if plan.tensor_map else None})
                result.expect(abs(error) <= self.tolerance,
                              f"{arch} {dtype} trainable={trainable}: the plan estimates {estimate} B at rest, the "
                              f"loaded model holds {real} B ({error:+.1%}, tolerance {self.tolerance:.0%})")
                result.expect(loaded.plan.bytes_per_device == plan.bytes_per_device,
                              f"{arch} {dtype}: the load's own plan differs from loadstone.plan's "
                              f"({loaded.plan.bytes_per_device} vs {plan.bytes_per_device})")
        result.record("cases", rows)

    def check_peak(self, result: CheckResult) -> None:
        import gc

        rows = []
        for arch, dtype in self.cases():
            folder = self.checkpoint(arch, dtype=dtype)
            plan = self.plan(folder, trainable=False)
            (device,) = set(plan.bytes_per_device)  # the kit places everything on one device
            gc.collect()
            with sequential_transformers_loading(), ConversionMeter(self.registration.component) as meter, \
                    AllocationPeak() as peak:
                loaded = self.load(folder, trainable=False)
            gc.collect()
            resting = stored_bytes(loaded.model, device=device)
            planned, planned_resting = plan.peak_bytes_per_device[device], plan.bytes_per_device[device]
            planned_in_flight = planned - planned_resting
            slack = self.tolerance * planned
            largest = max(meter.calls, key=lambda c: c.in_flight(peak), default=None)
            complete = peak.complete(resting, device=device, tolerance=self.tolerance)
            row = {"arch": arch, "dtype": dtype, "device": device, "engine": loaded.report.engine.get("name"),
                   "planned_peak": planned, "planned_in_flight": planned_in_flight, "measured_resting": resting,
                   "conversions": len(meter.calls),
                   "largest_conversion": largest.label if largest else None,
                   "conversion_in_flight": largest.in_flight(peak) if largest else None,
                   "whole_load_measured": complete}
            if complete:
                row.update(measured_peak=peak.peak.get(device, 0), measured_in_flight=peak.transient_peak.get(device))
            rows.append(row)
            case = f"{arch} {dtype}"
            if largest is not None:
                # A conversion holds the tensor it was handed and its own work tensors at once.
                result.expect(largest.in_flight(peak) <= planned_in_flight + slack,
                              f"{case}: converting {largest.label} held {largest.in_flight(peak)} B at once on "
                              f"{device} (the handed tensor and work tensors), the plan allows {planned_in_flight} B "
                              f"in flight (transient_bytes)")
            held = meter.handed_and_still_alive()
            result.expect(not held, f"{case}: tensors handed to load_tensor are still alive after the load "
                                    f"(a full-precision copy the plan does not count): {held[:5]}")
            if complete:
                measured = peak.peak.get(device, 0)
                result.expect(measured <= planned * (1 + self.tolerance),
                              f"{case}: the load peaked at {measured} B on {device}, the plan says {planned} B "
                              f"({measured / planned - 1:+.1%})")
                result.expect(device.startswith("cuda") or peak.transient_peak.get(device, 0) <= planned_in_flight + slack,
                              f"{case}: {peak.transient_peak.get(device)} B were in flight at once on {device} (read, "
                              f"converted, work tensors), the plan allows {planned_in_flight} B")
            elif largest is None:
                result.expect(False, f"{case}: nothing could be measured: the engine read and converted in threads "
                                     f"the profiler does not see, and load_tensor was never called")
        result.record("method", AllocationPeak.method + "; each load_tensor call measured in its own scope")
        result.record("cases", rows)

    def check_lora_training(self, result: CheckResult) -> None:
        rows = []
        for arch in self.architectures:
            loaded = self.load(self.adapter(arch))
            row = self._lora_row(arch, loaded, result)
            step = train_one_step(loaded.model)
            row.update(loss=step.loss, trainable=len(step.trainable))
            rows.append(row)
            result.expect(step.trainable and all("lora_" in n for n in step.trainable),
                          f"{arch}: trainable parameters other than the adapter's: "
                          f"{sorted(n for n in step.trainable if 'lora_' not in n)[:5] or 'none at all'}")
            result.expect(step.with_grad == step.trainable,
                          f"{arch}: gradients on {sorted(step.with_grad ^ step.trainable)[:5]} disagree with what "
                          f"is trainable")
            result.expect(step.changed == step.trainable,
                          f"{arch}: the step left {sorted(step.trainable - step.changed)[:5]} unchanged")
            result.expect(not step.frozen_changed, f"{arch}: the step changed frozen tensors "
                                                   f"{step.frozen_changed[:5]}")
            result.expect(step.loss == step.loss and abs(step.loss) != float("inf"), f"{arch}: loss {step.loss}")
        result.record("cases", rows)

    def _lora_row(self, arch: str, loaded: Any, result: CheckResult) -> dict[str, Any]:
        """Which LoRA layers wrap a module the backend converted, and of which type."""
        plan = loaded.plan
        converted_modules = {n.rpartition(".")[0] for n in (plan.tensor_map.converted if plan.tensor_map else ())}
        skeleton = dict(plan.build_skeleton().named_modules())
        wrapped: dict[str, str] = {}
        for name, module in loaded.model.named_modules():
            if not hasattr(module, "lora_A") or not hasattr(module, "get_base_layer"):
                continue
            inner = name.removeprefix("base_model.model.")
            if inner in converted_modules:
                base = module.get_base_layer()
                wrapped[inner] = type(base).__name__
                result.expect(type(base) is not type(skeleton[inner]) or self._same_type_allowed(base),
                              f"{arch}: {inner} is converted by the backend but LoRA wraps a plain "
                              f"{type(base).__name__}")
        return {"arch": arch, "lora_on_converted_modules": len(wrapped),
                "converted_module_types": sorted(set(wrapped.values()))}

    @staticmethod
    def _same_type_allowed(module: Any) -> bool:
        # A backend may convert tensors in place without a module type of its own (packing into
        # the same class); its converted weight then is not the dtype of a plain layer.
        weight = getattr(module, "weight", None)
        return weight is not None and not weight.is_floating_point()

    def check_gradient_checkpointing(self, result: CheckResult) -> None:
        arch = self.architectures[0]
        loaded = self.load(self.adapter(arch), gradient_checkpointing=True)
        notes = loaded.report.training.get("notes", [])
        result.expect(any("gradient checkpointing enabled" in n for n in notes),
                      f"the report's training notes do not say checkpointing was enabled: {notes}")
        for problem in checkpointing_is_non_reentrant(loaded.model):
            result.expect(False, problem)
        step = train_one_step(loaded.model)
        result.record("checkpointed_layers", step.checkpointed_layers)
        result.record("calls", {"forward": step.forward_calls, "recomputed_in_backward": step.recomputed})
        result.expect(step.checkpointed_layers > 0, "no layer has gradient checkpointing switched on")
        result.expect(step.recomputed > 0, "no layer was recomputed during the backward pass: checkpointing is "
                                           "switched on but not active")
        result.expect(step.trainable and step.with_grad == step.trainable and step.changed == step.trainable,
                      "with checkpointing, the adapter weights did not all receive gradients and change")

    def check_refusals(self, result: CheckResult) -> None:
        folder = self.checkpoint(self.architectures[0])
        cases = [({"quantization_options": {**self.options, _NO_SUCH_OPTION: 1}}, OptionError)] + self.refusals
        for kwargs, error_type in cases:
            try:
                self.plan(folder, **kwargs)
            except error_type as exc:
                result.expect(not isinstance(exc, PluginHookError) or error_type is PluginHookError,
                              f"{kwargs}: the refusal arrived wrapped as a PluginHookError (raise the typed "
                              f"LoadstoneError yourself): {exc.message}")
                result.expect(exc.fix, f"{kwargs}: {type(exc).__name__} without a fix: {exc.message}")
                if error_type is OptionError and _NO_SUCH_OPTION in str(kwargs):
                    result.expect(_NO_SUCH_OPTION in str(exc), f"the OptionError does not name the option: {exc}")
            except LoadstoneError as exc:
                result.expect(False, f"{kwargs}: expected {error_type.__name__}, got {type(exc).__name__}: {exc}")
            else:
                result.expect(False, f"{kwargs}: planned without error, expected {error_type.__name__}")
        plan = self.plan(folder)
        refused = {name: problems for name, problems in plan.engine_problems.items() if problems}
        result.record("engines_refusing", refused)
        for name, problems in refused.items():
            try:
                self.plan(folder, engine=name)
            except EngineError as exc:
                result.expect(repr(name) in exc.message and problems[0] in exc.message,
                              f"engine {name!r}: the EngineError does not name the engine and its reason: {exc.message}")
            except LoadstoneError as exc:
                result.expect(False, f"engine {name!r}: expected EngineError, got {type(exc).__name__}: {exc}")
            else:
                result.expect(False, f"engine {name!r} says it cannot run the plan ({problems}), yet planning "
                                     f"with engine={name!r} succeeded")
        result.expect(plan.report.engine.get("not_able") == refused,
                      f"the report's engine section does not list why engines were passed over: "
                      f"{plan.report.engine.get('not_able')}")

    def check_engines_agree(self, result: CheckResult) -> None:
        folder = self.checkpoint(self.architectures[0])
        able = [n for n, problems in self.plan(folder).engine_problems.items() if not problems]
        result.record("engines", able)
        if len(able) < 2:
            result.skip(f"only {', '.join(able) or 'no engine'} can run this backend; the refusals check covers "
                        f"the others")
            return
        for arch in self.architectures:
            folder = self.checkpoint(arch)
            maps = {name: reachable_tensors(self.load(folder, engine=name, trainable=False).model) for name in able}
            first = able[0]
            for other in able[1:]:
                for problem in compare_tensors(maps[first], maps[other])[:8]:
                    result.expect(False, f"{arch}: {first} vs {other}: {problem}")
            result.record(f"{arch}_tensors_compared", len(maps[first]))


def compare_tensors(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Differences between two :func:`~loadstone.testing.conformance.reachable_tensors` maps: names,
    dtypes, shapes, bits (NaN and -0.0 included), and scalar settings."""
    import torch

    problems = []
    for name in sorted(set(ours) ^ set(theirs)):
        problems.append(f"{name} only in {'the first' if name in ours else 'the second'}")
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            problems.append(f"{name}: a tensor in one, {type(b if isinstance(a, torch.Tensor) else a).__name__} "
                            f"in the other")
        elif not isinstance(a, torch.Tensor):
            if a != b:
                problems.append(f"{name}: {a!r} vs {b!r}")
        elif (a.dtype, tuple(a.shape), a.device.type) != (b.dtype, tuple(b.shape), b.device.type):
            problems.append(f"{name}: {a.dtype} {tuple(a.shape)} on {a.device} vs {b.dtype} {tuple(b.shape)} on "
                            f"{b.device}")
        elif a.device.type != "meta":
            x, y = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
            if x.is_floating_point() or x.is_complex():
                x, y = x.view(torch.uint8), y.view(torch.uint8)
            if not torch.equal(x, y):
                problems.append(f"{name}: values differ")
    return problems


def check_backend(method: str, *, only: Iterable[str] | None = None, skip: Iterable[str] = (),
                  **kwargs: Any) -> ConformanceReport:
    """Run the backend checks (:data:`BACKEND_CHECKS`) for the backend providing ``method``; the
    keyword arguments are :class:`BackendKit`'s (``plugins``, ``distribution``, ``options``,
    ``architectures``, ``dtypes``, ``measure``, ``tolerance``, ``engine``, ``placement``, ``refusals``,
    ``heavy_modules``, ``workdir``)."""
    return BackendKit(method, **kwargs).run(only=only, skip=skip)
