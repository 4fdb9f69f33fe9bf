"""Validation and encoding of the tenant and key fields an admin may set (limits, allow-lists, role...).

Pure functions; each raises :class:`~skyfleet.errors.InvalidRequestError` naming the field. The
allow-lists are stored as JSON text arrays (NULL: unrestricted).
"""

from __future__ import annotations

import json
from typing import Any

from skyfleet.errors import InvalidRequestError
from skyfleet.iam.authz import ROLES

KEY_NAME_MAX_LENGTH = 200
RETENTION_DAYS_MAX = 36_500
#: Fields :meth:`TenantRepository.update` and :meth:`ApiKeyRepository.update` may change.
TENANT_FIELDS = frozenset({"retention_days", "rpm_limit", "tpm_limit", "share_public_prefix"})
KEY_FIELDS = frozenset({"name", "role", "expires_at", "models", "cidrs", "rpm_limit", "tpm_limit"})
#: Bounds of a per-minute limit and of an allow-list's length.
LIMIT_MAX = 1_000_000_000
ALLOW_LIST_MAX = 64
MODEL_NAME_MAX_LENGTH = 200


def check_limit(value: Any, param: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMIT_MAX):
        raise InvalidRequestError(f"{param} must be an integer from 1 to {LIMIT_MAX}, or null", param=param)
    return value


def check_models(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset))
            or not 1 <= len(value) <= ALLOW_LIST_MAX
            or not all(isinstance(m, str) and 1 <= len(m) <= MODEL_NAME_MAX_LENGTH for m in value)):
        raise InvalidRequestError(
            f"models must be a list of 1 to {ALLOW_LIST_MAX} model names, or null (every model)", param="models")
    return tuple(sorted(set(value)))


def check_cidrs(value: Any) -> tuple[str, ...] | None:
    from skyfleet.iam.cidr import normalise_cidr

    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) \
            or not 1 <= len(value) <= ALLOW_LIST_MAX:
        raise InvalidRequestError(
            f"cidrs must be a list of 1 to {ALLOW_LIST_MAX} networks, or null (any address)", param="cidrs")
    try:
        return tuple(sorted({normalise_cidr(c) for c in value}))
    except ValueError:
        raise InvalidRequestError("cidrs: each entry must be an IP address or network, e.g. 10.0.0.0/8",
                                  param="cidrs") from None


def check_role(role: Any) -> str:
    if role not in ROLES:
        raise InvalidRequestError(f"role must be one of: {', '.join(ROLES)}", param="role")
    return str(role)


def check_key_name(name: Any) -> str | None:
    if name is not None and (not isinstance(name, str) or len(name) > KEY_NAME_MAX_LENGTH):
        raise InvalidRequestError(f"key name must be at most {KEY_NAME_MAX_LENGTH} characters", param="name")
    return name


def check_retention(days: Any) -> int | None:
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= RETENTION_DAYS_MAX
    ):
        raise InvalidRequestError(
            f"retention_days must be an integer from 1 to {RETENTION_DAYS_MAX}, or null", param="retention_days")
    return days


def json_list(value: tuple[str, ...] | None) -> str | None:
    return None if value is None else json.dumps(list(value))


def from_json_list(text_value: str | None) -> tuple[str, ...] | None:
    if text_value is None:
        return None
    data = json.loads(text_value)
    return tuple(str(v) for v in data) if isinstance(data, list) else ()
