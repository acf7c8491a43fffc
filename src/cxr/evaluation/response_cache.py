"""An append-only JSONL cache of final answers, so an interrupted evaluation resumes where it stopped.

The key is the file's content hash plus the endpoint and the model version: a new model or another
service never reuses an old answer, and a renamed or copied file is not sent twice. Only final answers
(``ok`` and ``refused``) are kept; a ``failed`` request is sent again next time. Each answer is flushed
as soon as it arrives, and a line cut short by a killed process is ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

from cxr.serving.client import Answer

log = logging.getLogger(__name__)
FINAL = ("ok", "refused")


def cache_key(content_sha256: str, endpoint: str, model_version: str) -> str:
    return hashlib.sha256(f"{content_sha256}|{endpoint}|{model_version}".encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._answers: dict[str, Answer] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # a torn last line: new entries must start on their own line
            with open(self.path, "a") as fh:
                fh.write("\n")
        skipped = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self._answers[entry["key"]] = Answer(**entry["answer"])
            except (ValueError, KeyError, TypeError):
                skipped += 1
        if skipped:
            log.warning("%s: %d unreadable cache lines ignored (an interrupted write)", self.path, skipped)

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> Answer | None:
        return self._answers.get(key)

    def put(self, key: str, answer: Answer) -> None:
        if answer.status not in FINAL:
            return
        line = json.dumps({"key": key, "answer": answer.to_dict()}, allow_nan=False)
        with self._lock:
            self._answers[key] = answer
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(line + "\n")
