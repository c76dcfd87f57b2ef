"""Stage 4, load_weights: the chosen engine fills the model, the backend finishes it, and the
kernel checks the result the same way for every engine and backend.

The kernel's invariants: no tensor left on the meta device (unless accelerate serves it from an
offload map), every tensor on its planned device and in its planned dtype (tensors the backend
converts excepted), tied weights still one tensor.
"""

from __future__ import annotations

from typing import Any

from ..contract.engines import EngineContext
from ..contract.errors import CheckpointError, WeightsMismatchError
from ..contract.placement import map_entry
from ..contract.plan import Plan
from ..contract.records import Registration
from ..contract.report import LoadReport
from ..contract.units import device_label, normalize_device
from ..faults import OffloadWorkspace, offload_disk_full
from ..plugins import PluginManager

_SHOW = 6


class GuardedComponent:
    """A component whose every method call runs under ``PluginManager.guard`` (crashes name the plugin)."""

    def __init__(self, reg: Registration, plugins: PluginManager, stage: str):
        self._reg, self._plugins, self._stage = reg, plugins, stage

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._reg.component, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._plugins.guard(self._reg, self._stage, name):
                return attr(*args, **kwargs)

        return call


def load_weights(plan: Plan, plugins: PluginManager, report: LoadReport, *, progress: bool,
                 offload: OffloadWorkspace | None = None) -> Any:
    qreg, engine = plan.quantization_backend, plan.engine
    assert engine is not None, "the plan stage chooses an engine"
    plan.quantization.state = {}
    ctx = EngineContext(GuardedComponent(qreg, plugins, "load_weights"), progress=progress,
                        offload_folder=offload.path if offload is not None else None)
    # The plan was made from these files' headers; an engine must not read others (whatever it
    # reads through, a file truncated under a memory map would end the process with SIGBUS).
    _refuse_changed_files(plan, "between the plan and the load")
    try:
        with plugins.guard(engine, "load_weights", "load"):
            model = engine.component.load(plan, ctx)
    except Exception as exc:
        # Whatever the engine's error says (safetensors: "failed to fill whole buffer"), a file that
        # changed meanwhile is the cause to report, unless the error already names that file.
        changed = plan.inventory.changed_file("during the load")
        named = [exc.file] if isinstance(exc, CheckpointError) and exc.file else []
        if changed is not None and not (named and plan.inventory.changed_file("during the load", among=named)):
            raise changed from exc
        full = None if changed is not None else offload_disk_full(exc, offload, plan.bytes_per_device.get("disk"))
        if full is not None:
            raise full from exc
        raise
    _refuse_changed_files(plan, "during the load")
    report.notes.extend(ctx.notes)
    if ctx.timings:
        report.engine["timings"] = dict(ctx.timings)
    with plugins.guard(qreg, "load_weights", "finish_model"):
        report.notes.extend(qreg.component.finish_model(model, plan.quantization))
    plan.quantization.state = {}
    check_loaded_model(model, plan)
    return model


def _refuse_changed_files(plan: Plan, moment: str) -> None:
    changed = plan.inventory.changed_file(moment)
    if changed is not None:
        raise changed


def _offloaded_modules(model: Any) -> set[str]:
    """Modules whose tensors accelerate serves through an offload hook (cpu/disk entries of a map
    that also uses an accelerator): their parameters are kept in a weights map and sit on meta in
    the module, their buffers move to the hook's execution device. Both are where accelerate wants
    them. A module's nearest hook (its own, else its closest ancestor's) decides."""
    offloaded, decided = set(), {}
    for name, module in model.named_modules(remove_duplicate=False):
        hook = vars(module).get("_hf_hook")  # accelerate sets it as a plain attribute (no Module lookup)
        if hook is not None:
            decided[name] = bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None
        else:  # named_modules lists every parent before its children
            decided[name] = decided.get(name.rpartition(".")[0], False) if name else False
        if decided[name]:
            offloaded.add(name)
    return offloaded


def check_loaded_model(model: Any, plan: Plan) -> None:
    """Raise :class:`WeightsMismatchError` unless the model is as the plan says."""
    tensor_map = plan.tensor_map
    converted = tensor_map.converted if tensor_map is not None else frozenset()
    dtypes = tensor_map.dtypes if tensor_map is not None else {}
    on_meta, misplaced, mistyped = [], [], []
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    # asked once per module, not walked up once per tensor: 17 ms for a 32-layer Llama on a slow CPU
    offloaded = _offloaded_modules(model)
    # labels asked once per map key and per device, not once per tensor (hundreds of tensors, a few keys)
    planned_labels = {key: None if value == "disk" else device_label(normalize_device(value))
                      for key, value in plan.device_map.items()}
    labels: dict[Any, str] = {}
    for name, tensor in tensors:
        if offloaded and name.rpartition(".")[0] in offloaded:
            continue
        device = tensor.device
        if device.type == "meta":
            on_meta.append(name)
            continue
        key = map_entry(name, plan.device_map)
        planned = planned_labels.get(key) if key is not None else None
        if planned is not None:
            found = labels.get(device) or labels.setdefault(device, _device_of(tensor))
            if planned != found:
                misplaced.append(f"{name} on {found}, planned {planned}")
        want = dtypes.get(name)
        if want is not None and name not in converted and str(tensor.dtype).replace("torch.", "") != want:
            mistyped.append(f"{name} is {str(tensor.dtype).replace('torch.', '')}, planned {want}")
    untied = []
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        try:
            a, b = model.get_parameter(target), model.get_parameter(source)
        except AttributeError:
            continue
        if a is not b and a.data_ptr() != b.data_ptr():
            untied.append(f"{target} / {source}")
    problems = []
    if on_meta:
        problems.append(f"{len(on_meta)} left on the meta device (never loaded): {', '.join(on_meta[:_SHOW])}")
    if misplaced:
        problems.append(f"{len(misplaced)} not on their planned device: {'; '.join(misplaced[:_SHOW])}")
    if mistyped:
        problems.append(f"{len(mistyped)} not in their planned dtype: {'; '.join(mistyped[:_SHOW])}")
    if untied:
        problems.append(f"tied weights no longer tied: {', '.join(untied[:_SHOW])}")
    if problems:
        engine = plan.engine.name if plan.engine else "?"
        raise WeightsMismatchError(
            f"the model loaded by engine {engine!r} is not what the plan says: " + "; ".join(problems) + ".",
            file=plan.sources.base.path, field="loaded tensors", expected="every tensor loaded, on its planned "
            "device and dtype, tied weights tied", found="; ".join(problems),
            fix=f"report it to the maintainers of the engine {engine!r} and of the quantization backend "
                f"{plan.quantization_backend.name!r}; meanwhile try another engine (engine='transformers')")


def _device_of(tensor: Any) -> str:
    return device_label(normalize_device(str(tensor.device)))
