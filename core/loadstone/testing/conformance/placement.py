"""The placement strategy kit: :class:`PlacementKit` and :func:`check_placement`."""

from __future__ import annotations

from typing import Any, Iterable

from ...contract.placement import map_entry
from ...contract.units import device_label, normalize_device
from .report import CheckResult, ConformanceReport, Kit

PLACEMENT_CHECKS = {
    "listing": "a fresh `loadstone plugins --json` lists the strategy from its distribution without importing a "
               "heavy library",
    "attribution": "the report's placement decision names the plugin and distribution",
    "every_tensor_placed": "the device map places every parameter and buffer, names only modules and tensors the "
                           "model has, and only devices loadstone knows",
    "tied_together": "tied weights (one tensor under two names) land on one device",
    "plan_equals_load": "a load uses exactly the plan's map, and every tensor sits where the map says",
    "deterministic": "planning twice gives the same map",
    "whole_model_device": "a strategy that names the whole model's device before planning (whole_model_device) "
                          "places the whole model exactly there",
}


class PlacementKit(Kit):
    """Checks a placement strategy on tiny architectures.

    :param spec: the ``placement=`` value that selects the strategy (``"memory-fraction:0.5"``).
    :param load_kwargs: further ``load``/``plan`` arguments (``max_memory`` ...).
    :param offload: give every plan and load an offload folder (for strategies that use disk).
    :param architectures: default: a plain decoder, GPT-2 (tied embeddings) and an MoE model.
    """

    kind = "placement"
    checks = PLACEMENT_CHECKS

    def __init__(self, spec: Any, *, load_kwargs: dict[str, Any] | None = None, offload: bool = False,
                 architectures: Iterable[str] = ("llama", "gpt2", "mixtral"), **kwargs: Any):
        self.spec = spec
        self.load_kwargs = dict(load_kwargs or {})
        self.offload = offload
        self.architectures = tuple(architectures)
        super().__init__(**kwargs)

    def _find(self) -> Any:
        return self.plugins.placement_strategy("explicit" if isinstance(self.spec, dict) else self.spec)

    def _kwargs(self, arch: str) -> dict[str, Any]:
        kwargs = {"placement": self.spec, "plugins": self.plugins, **self.load_kwargs}
        if self.offload:
            folder = self.workdir / f"offload-{arch}"
            folder.mkdir(exist_ok=True)
            kwargs.setdefault("offload_folder", str(folder))
        return kwargs

    def plan(self, arch: str) -> Any:
        import loadstone

        return loadstone.plan(str(self.checkpoint(arch)), **self._kwargs(arch))

    # -- checks ----------------------------------------------------------------------------
    def check_attribution(self, result: CheckResult) -> None:
        plan = self.plan(self.architectures[0])
        decision = plan.report.decision("placement")
        for problem in self.owner_problems(decision, "placement"):
            result.expect(False, problem)
        result.record("decision", decision.to_dict() if decision else None)

    def check_every_tensor_placed(self, result: CheckResult) -> None:
        maps = {}
        for arch in self.architectures:
            plan = self.plan(arch)
            skeleton = plan.build_skeleton()
            names = [n for n, _ in [*skeleton.named_parameters(remove_duplicate=False),
                                    *skeleton.named_buffers(remove_duplicate=False)]]
            unplaced = [n for n in names if map_entry(n, plan.device_map) is None]
            result.expect(not unplaced, f"{arch}: {len(unplaced)} tensors are not placed: {unplaced[:5]}")
            known = {n for n, _ in skeleton.named_modules()} | set(names)
            unknown = [k for k in plan.device_map if k and k not in known]
            result.expect(not unknown, f"{arch}: the map names what the model does not have: {unknown[:5]}")
            for key, device in plan.device_map.items():
                try:
                    device_label(normalize_device(device))
                except Exception as exc:
                    result.expect(False, f"{arch}: entry {key!r} -> {device!r} is not a device ({exc})")
            maps[arch] = {k: device_label(v) for k, v in plan.device_map.items()}
        result.record("maps", maps)

    def check_tied_together(self, result: CheckResult) -> None:
        checked = 0
        for arch in self.architectures:
            plan = self.plan(arch)
            tied = getattr(plan.build_skeleton(), "all_tied_weights_keys", None) or {}
            for target, source in tied.items():
                entries = map_entry(target, plan.device_map), map_entry(source, plan.device_map)
                if None in entries:
                    continue  # reported by every_tensor_placed
                devices = [device_label(plan.device_map[e]) for e in entries]
                result.expect(devices[0] == devices[1], f"{arch}: {target} -> {devices[0]} but its tied twin "
                                                        f"{source} -> {devices[1]}")
                checked += 1
        result.record("tied_pairs_checked", checked)
        if checked == 0:
            result.skip("none of the architectures has tied weights")

    def check_plan_equals_load(self, result: CheckResult) -> None:
        import loadstone

        from ...stages.plan.memory import missing_devices

        loaded_any = False
        for arch in self.architectures:
            plan = self.plan(arch)
            absent = missing_devices(plan.device_map.values())
            if absent:
                result.record(f"{arch}_not_loaded", f"the map uses {', '.join(absent)}, absent here")
                continue
            loaded = loadstone.load(str(self.checkpoint(arch)), progress=False, **self._kwargs(arch))
            loaded_any = True
            result.expect(loaded.plan.device_map == plan.device_map,
                          f"{arch}: the load used {loaded.plan.device_map}, the plan said {plan.device_map}")
            for problem in placement_problems(loaded.model, plan.device_map)[:6]:
                result.expect(False, f"{arch}: {problem}")
        if not loaded_any:
            result.skip("every map uses devices this machine does not have")

    def check_deterministic(self, result: CheckResult) -> None:
        for arch in self.architectures:
            first, second = self.plan(arch).device_map, self.plan(arch).device_map
            result.expect(first == second, f"{arch}: two plans gave {first} and {second}")

    def check_whole_model_device(self, result: CheckResult) -> None:
        if isinstance(self.spec, dict):
            result.skip("an explicit device map names its devices itself")
            return
        device = self._find().component.whole_model_device(self.spec)
        if device is None:
            result.skip("the strategy does not name the device before planning (whole_model_device is None)")
            return
        want = {"": device_label(normalize_device(device))}
        for arch in self.architectures:
            got = {k: device_label(normalize_device(v)) for k, v in self.plan(arch).device_map.items()}
            result.expect(got == want, f"{arch}: whole_model_device({self.spec!r}) said {want['']}, "
                                       f"but place() returned {got}")
        result.record("device", want[""])


def placement_problems(model: Any, device_map: dict[str, Any]) -> list[str]:
    """Tensors not where ``device_map`` says: on the mapped device, or for ``disk`` on the meta
    device behind an accelerate hook that serves it (buffers of disk-mapped modules may also stay in
    CPU memory: accelerate offloads parameters only, unless asked to offload buffers)."""
    problems = []
    modules = dict(model.named_modules())
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = map_entry(name, device_map)
        if key is None:
            problems.append(f"{name} is not placed by the map")
            continue
        want = device_label(normalize_device(device_map[key]))
        served = getattr(getattr(modules.get(name.rpartition(".")[0]), "_hf_hook", None), "offload", False)
        if tensor.device.type == "meta":
            if not served:
                problems.append(f"{name} was never loaded (meta)")
        elif want == "disk":
            if not (name in buffers and tensor.device.type == "cpu"):
                problems.append(f"{name} should be served from disk, is on {tensor.device}")
        elif device_label(normalize_device(str(tensor.device))) != want:
            problems.append(f"{name} is on {tensor.device}, the map says {want}")
    return problems


def check_placement(spec: Any, *, only: Iterable[str] | None = None, skip: Iterable[str] = (),
                    **kwargs: Any) -> ConformanceReport:
    """Run the placement checks (:data:`PLACEMENT_CHECKS`) for the strategy ``placement=spec``
    selects; the keyword arguments are :class:`PlacementKit`'s (``plugins``, ``distribution``,
    ``load_kwargs``, ``offload``, ``architectures``, ``heavy_modules``, ``workdir``)."""
    return PlacementKit(spec, **kwargs).run(only=only, skip=skip)
