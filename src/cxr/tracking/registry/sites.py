"""What a version learns at other sites: their operating points (thresholds) and out-of-distribution shares."""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

from cxr.tracking.registry.errors import RegistryError
from cxr.tracking.registry.versions import registry_client, version_entry

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from cxr.config import Config

log = logging.getLogger(__name__)


EXTERNAL_OOD_PREFIX = "external_ood_share."  # + an external set's dataset hash: the share it had out of distribution


def record_external_ood(cfg: "Config", name: str, version: str, dataset_hash: str, share: float) -> str:
    """The share of an external set flagged out of distribution, as version tag ``external_ood_share.HASH``."""
    client = registry_client(cfg)
    key = f"{EXTERNAL_OOD_PREFIX}{dataset_hash[:12]}"
    client.set_model_version_tag(name, str(version), key, f"{share:.4f}")
    return key


OPERATING_POINT_PREFIX = "operating_point."


SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_site_name(site: str) -> str:
    if not SITE_NAME.fullmatch(site):
        raise RegistryError(f"site name {site!r}: use 1-64 letters, digits, '-' or '_' (e.g. hospital_b)")
    return site


def save_operating_point(cfg: "Config", name: str, version: str, site: str, point: dict[str, Any]) -> str:
    """Store ``point`` (threshold, rule, ...) as the version tag ``operating_point.SITE``; returns the tag key."""
    client = registry_client(cfg)
    version_entry(client, name, version)
    key = OPERATING_POINT_PREFIX + check_site_name(site)
    client.set_model_version_tag(name, str(version), key, json.dumps(point, sort_keys=True))
    return key


def operating_points(version: "ModelVersion") -> dict[str, dict[str, Any]]:
    """The named operating points stored on a version, by site name (unreadable tags are left out)."""
    points = {}
    for key, value in (version.tags or {}).items():
        if not key.startswith(OPERATING_POINT_PREFIX):
            continue
        try:
            point = json.loads(value)
            points[key[len(OPERATING_POINT_PREFIX) :]] = {**point, "threshold": float(point["threshold"])}
        except (ValueError, TypeError, KeyError):
            log.warning("version %s: tag %s is not an operating point; ignored", version.version, key)
    return points
