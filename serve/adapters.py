"""Which LoRA adapter each companion speaks through, checked and loaded into the engine.

An adapter reaches the engine only after adapters.verify has read its safetensors header
against the base model, and then only through vLLM's runtime API: a running engine refuses a
bad one and keeps serving everyone else. One the engine refuses at a (re)start is set aside
with the reason, in its companion's listing (which only its owner sees, or every member for a
shared companion), and the companion speaks through the base model meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from serve.chat import ChatService, adapter_name
from serve.engine import AdapterRefused
from store import adapters
from store.adapters import AdapterError
from store.companions import visible_id
from store.users import LOCAL

log = logging.getLogger(__name__)


class AdapterService:
    def __init__(self, data_dir: Path, chat: ChatService):
        self.data_dir = data_dir
        self.chat = chat
        self.base: adapters.Base | None = None   # known once the model is on disk
        self.problems: dict[str, str] = {}     # companion id -> why its adapter is not used
        chat.engine.on_adapter_refused = self._refused

    @property
    def base_sha256(self) -> str | None:
        return self.base.sha256 if self.base else None

    def identify_base(self, model_path: str | None) -> None:
        if model_path and Path(model_path).is_dir():
            try:
                self.base = adapters.Base.of(Path(model_path), self.chat.engine.config.max_lora_rank)
            except AdapterError as err:
                log.warning("adapters: %s", err)

    def _refused(self, name: str, why: str) -> None:
        """The engine would not load `name` at a (re)start: its companion speaks through the base
        model, and its listing says why, until the owner chooses a version again."""
        companion_id, _, version = name.rpartition("--")
        if self.chat.adapters.get(companion_id) == version:
            self._speak(companion_id, None)
        self.problems[companion_id] = f"the engine refused adapter {version}: {why}"
        log.error("adapters: %s: not used: %s", companion_id, self.problems[companion_id])

    def register_current(self, companion_ids: list[str]) -> None:
        """Before the engine starts: every companion's adapter in use, if it fits this model."""
        for companion_id in companion_ids:
            try:
                version = adapters.current(self.data_dir, companion_id)
                if version is None:
                    continue
                path = self._checked(companion_id, version)
            except AdapterError as err:
                self.problems[companion_id] = f"{err}{self._fitting_hint(companion_id)}"
                log.error("adapters: %s: not used: %s", companion_id, self.problems[companion_id])
                continue
            self.chat.engine.adapters[adapter_name(companion_id, version)] = str(path)
            self._speak(companion_id, version)
            log.info("adapters: %s speaks through %s", companion_id, version)

    async def use(self, companion_id: str, version: str | None) -> None:
        """Switch a companion to `version` (None: the base model) at once."""
        if version is not None and self.chat.engine.state == "stopped":   # no engine runs here
            adapters.checked_version(version)
            self.use_at_start(companion_id, version)
            return
        if version is not None:
            adapters.checked_version(version)   # before anything is loaded, restarted or written
            path = self._checked(companion_id, version)
            try:
                await self.chat.engine.load_adapter(adapter_name(companion_id, version), str(path))
            except AdapterRefused as err:
                raise AdapterError(f"adapter {version} of {visible_id(companion_id)!r}: {err}") from err
        self._speak(companion_id, version)
        adapters.set_current(self.data_dir, companion_id, version)
        self.problems.pop(companion_id, None)

    def use_at_start(self, companion_id: str, version: str) -> None:
        """Switch a companion to `version` while the engine is stopped: given to vLLM at its next
        start (a training that stopped it ends with one start, not two)."""
        path = self._checked(companion_id, version)
        self.chat.engine.adapters[adapter_name(companion_id, version)] = str(path)
        self.chat.engine.lora = True
        self._speak(companion_id, version)
        adapters.set_current(self.data_dir, companion_id, version)
        self.problems.pop(companion_id, None)

    def _speak(self, companion_key: str, version: str | None) -> None:
        """The companion speaks through `version` (None: the base model), with that version's
        fitted sampling (its manifest's `sampling`, if it has one)."""
        if version is None:
            self.chat.adapters.pop(companion_key, None)
            self.chat.fitted.pop(companion_key, None)
            return
        self.chat.adapters[companion_key] = version
        try:
            fitted = adapters.manifest(self.data_dir, companion_key, version).get("sampling")
        except AdapterError:
            fitted = None
        if fitted:
            self.chat.fitted[companion_key] = fitted
        else:
            self.chat.fitted.pop(companion_key, None)

    def trained_by_others(self, companion_key: str, user: str) -> list[str]:
        """Versions trained on the history of a user other than `user`."""
        return [v for v in adapters.versions(self.data_dir, companion_key)
                if adapters.manifest(self.data_dir, companion_key, v).get("user", LOCAL) != user]

    async def forget(self, companion_key: str) -> None:
        """A deleted companion: its adapters leave the engine and the disk."""
        self._speak(companion_key, None)
        self.problems.pop(companion_key, None)
        await self.chat.engine.unload_adapters(f"{companion_key}--")
        await asyncio.to_thread(shutil.rmtree, adapters.adapters_dir(self.data_dir, companion_key), True)

    def listing(self, companion_id: str) -> dict:
        found = []
        for version in adapters.versions(self.data_dir, companion_id):
            info = adapters.manifest(self.data_dir, companion_id, version)
            found.append({"version": version, "created_at": info.get("created_at"),
                          "base_model": info.get("base_model"), "metrics": info.get("metrics"),
                          "fits_base_model": info.get("base_model", {}).get("sha256") == self.base_sha256})
        return {"current": self.chat.adapters.get(companion_id), "versions": found,
                "problem": self.problems.get(companion_id)}

    def _fitting_hint(self, companion_id: str) -> str:
        """Which versions of the companion were trained on the model this server runs, if any."""
        fit = []
        for version in adapters.versions(self.data_dir, companion_id):
            try:
                trained_on = adapters.manifest(self.data_dir, companion_id, version).get("base_model", {})
            except AdapterError:   # a damaged manifest fits nothing
                continue
            if self.base_sha256 and trained_on.get("sha256") == self.base_sha256:
                fit.append(version)
        if fit:
            return (f"; {', '.join(fit)} {'were' if len(fit) > 1 else 'was'} trained on this model: "
                    f"`homefire adapter use {companion_id.rpartition('.')[2]} {fit[-1]}`")
        return ""

    def _checked(self, companion_id: str, version: str) -> Path:
        adapters.manifest(self.data_dir, companion_id, version)   # names the known versions if missing
        path = adapters.version_dir(self.data_dir, companion_id, version)
        adapters.verify(path, self.base)
        return path
