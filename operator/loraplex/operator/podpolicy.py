"""What an engine pod may be: the checks a BaseModelDeployment's engine must pass before anything
is rendered, and the hardening every engine pod gets. Pure functions.

The operator creates the engine pods with its own privileges, so without these checks creating a
BaseModelDeployment would be as strong as creating any pod: a hostPath volume, any image (issue
20, finding 8). So:

- `spec.engine.image` must come from an allowed registry or repository (the operator's
  LORAPLEX_ENGINE_IMAGE_PREFIXES, set by the chart's engineImages.allowedPrefixes; default the
  project's own repository, ghcr.io/loraplex/). An entry ending in `/` allows everything under it;
  any other entry allows that repository (any tag or digest); `*` allows any image.
- `spec.engine.volumes` may only be of the types in VOLUME_TYPES: data the pod's namespace
  already holds (ConfigMaps, Secrets, PVCs), scratch space (emptyDir, generic ephemeral volumes)
  and the pod's own metadata. Never hostPath, nor any other type that reaches the node or a
  storage system directly.
A spec that breaks one gets phase Failed, a Progressing=False/InvalidSpec condition with the
message and a Warning Event, and nothing of it is applied (reconcile.reconcile_base).

Every engine pod runs as uid/gid 65532 (the image's user), non-root, under the runtime's default
seccomp profile, with no privilege escalation, every capability dropped, a read-only root file
system (the writable places are emptyDirs: /tmp and the caches under /var/cache/loraplex) and no
service-account token: the engine never calls the Kubernetes API.
"""
from __future__ import annotations

from typing import Any

RUN_AS = 65532  # the user of the images (Dockerfile.engine, Dockerfile.operator)
VOLUME_TYPES = ("configMap", "secret", "emptyDir", "persistentVolumeClaim", "ephemeral", "downwardAPI")
ANY_IMAGE = "*"


class PolicyViolation(ValueError):
    """A BaseModelDeployment asks for an engine pod the operator will not create."""


def image_allowed(image: str, prefixes: tuple[str, ...]) -> bool:
    for p in prefixes:
        if p == ANY_IMAGE:
            return True
        if p.endswith("/") and image.startswith(p):
            return True
        if image == p or image.startswith((p + ":", p + "@")):
            return True
    return False


def check_engine(spec: dict, image_prefixes: tuple[str, ...]) -> None:
    """Raise PolicyViolation when the engine's image or volumes are not allowed (spec with defaults)."""
    engine = spec.get("engine") or {}
    image = str(engine.get("image") or "")
    if not image_allowed(image, image_prefixes):
        raise PolicyViolation(f"spec.engine.image {image!r} is not from an allowed registry or repository "
                              f"({', '.join(image_prefixes) or 'none allowed'}; the operator's "
                              "LORAPLEX_ENGINE_IMAGE_PREFIXES, the chart's engineImages.allowedPrefixes)")
    for i, volume in enumerate(engine.get("volumes") or []):
        kinds = sorted(k for k in volume if k != "name")
        bad = [k for k in kinds if k not in VOLUME_TYPES]
        if bad or not kinds:
            raise PolicyViolation(f"spec.engine.volumes[{i}] ({volume.get('name')!r}): volume type "
                                  f"{', '.join(bad) or 'missing'} is not allowed in an engine pod; allowed: "
                                  f"{', '.join(VOLUME_TYPES)}")


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}
