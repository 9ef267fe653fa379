"""AdapterRegistry: the LoRA adapters an engine serves, by name: those named at start (--lora, --lora-dir) and
those loaded and unloaded at runtime, from inside --lora-dir only. Which adapters sit in the device's slots
is the LoRAPool's business (server/lora.py); this keeps the names, the ids and the checks."""
import asyncio
import logging
from pathlib import Path

from batching.messages import AdapterInfo
from server.config import EngineConfig
from server.cpu_threads import release_idle_team
from server.errors import ModelNotFoundError
from server.lora import LoRAAdapter, LoRAError, load_adapter
from server.models.model_config import ModelConfig

log = logging.getLogger(__name__)


class AdapterRegistry:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_name: str):
        self.config, self.model_config, self.model_name = config, model_config, model_name
        self.by_name: dict[str, LoRAAdapter] = {}
        self._next_id = 1
        self.skipped_at_start = 0    # bad adapters in --lora-dir, left out (the server serves the rest)
        for name, path in config.loras:
            self._register(load_adapter(name, path, model_config, self._take_id(), config.max_lora_rank))
        for name, path in adapters_in(config.lora_dir):
            if name in self.by_name:
                continue
            try:
                self._register(load_adapter(name, path, model_config, self._take_id(), config.max_lora_rank,
                                            root=Path(config.lora_dir).resolve()))
            except LoRAError as e:
                log.error("--lora-dir: skipped adapter %r: %s", name, e)
                self.skipped_at_start += 1

    def resolve(self, name: str | None) -> LoRAAdapter | None:
        """None or the base model's name: the base model. Anything else must be a loaded adapter."""
        if name is None or name == "" or name == self.model_name:
            return None
        adapter = self.by_name.get(name)
        if adapter is None:
            known = ", ".join([self.model_name, *self.by_name])
            raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves {known}")
        return adapter

    def infos(self) -> list[AdapterInfo]:
        return [AdapterInfo(a.name, str(a.path), a.rank) for a in self.by_name.values()]

    async def load(self, name: str, path: str) -> AdapterInfo:
        """A PEFT adapter from inside --lora-dir, read on a thread of its own; LoRAError says what is wrong."""
        if not name or name == self.model_name or name in self.by_name:
            raise LoRAError(f"the name {name!r} is taken or empty; adapters need a name of their own")
        if self.config.lora_dir is None:
            raise LoRAError("loading adapters at runtime needs --lora-dir (the directory adapters are loaded from)")
        root = Path(self.config.lora_dir).resolve()
        try:
            resolved = (root / path).resolve()
        except (OSError, ValueError) as e:   # a NUL byte, a path too long for the system
            raise LoRAError(f"the adapter path {path[:80]!r} cannot be used: {e}") from None
        if not resolved.is_relative_to(root):
            raise LoRAError(f"the adapter path {path[:80]!r} is outside --lora-dir")

        adapter_id = self._take_id()   # here, on the loop: two loads at once never share an id

        def read():
            try:
                return load_adapter(name, resolved, self.model_config, adapter_id, self.config.max_lora_rank, root)
            finally:
                release_idle_team()   # this worker thread's parallel ops leave no OpenMP team behind
        adapter = await asyncio.to_thread(read)
        if name in self.by_name:  # loaded twice at once: the first one wins
            raise LoRAError(f"the name {name!r} is taken or empty; adapters need a name of their own")
        self._register(adapter)
        return AdapterInfo(adapter.name, str(adapter.path), adapter.rank)

    def remove(self, name: str) -> LoRAAdapter:
        """Forgets the name at once (new requests for it are refused); the caller waits for its requests."""
        adapter = self.by_name.pop(name, None)
        if adapter is None:
            raise ModelNotFoundError(f"no adapter named {name!r} is loaded")
        return adapter

    def _register(self, adapter: LoRAAdapter):
        self.by_name[adapter.name] = adapter
        log.info("loaded LoRA adapter %r (rank %d, %d projections) from %s", adapter.name, adapter.rank,
                 len(adapter.weights), adapter.path)

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1


def adapters_in(lora_dir: str | None) -> list[tuple[str, str]]:
    """Every adapter directly inside --lora-dir, named by its directory."""
    if lora_dir is None:
        return []
    root = Path(lora_dir)
    if not root.is_dir():
        raise LoRAError(f"--lora-dir {lora_dir} is not a directory")
    # one that leads outside the directory (a symlink) is refused by load_adapter's root check, file by file
    return [(d.name, str(d)) for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()]
