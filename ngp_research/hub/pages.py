"""What the hub's pages show: a member's projects, what each workspace will hold, or why it cannot start."""

from ..access import AccessPolicy
from . import state


def projects_for(user) -> list[dict]:
    """Projects ``user`` belongs to, each with its datasets (region) or the reasons it cannot start.

    Projects whose approval is not valid now are listed with the reason, so a
    member sees why a workspace is missing; projects the user is not a member
    of are never listed.
    """
    catalog = state.catalog()
    policy = AccessPolicy(catalog)
    name = getattr(user, "name", user)
    out = []
    for p in catalog.projects():
        if not any(m.user.username == name for m in p.memberships):
            continue
        d = policy.files(name, p.name)
        out.append({
            "name": p.name,
            "title": p.title,
            "approval": p.approval_number,
            "valid_from": p.valid_from.isoformat(),
            "valid_until": p.valid_until.isoformat(),
            "role": next(m.role for m in p.memberships if m.user.username == name),
            "profile": f"{p.workspace_cpu:g} CPU, {p.workspace_memory}",
            "allowed": d.allowed,
            "datasets": [{"region": r, "dataset": ds} for r, ds in d.datasets],
            "reasons": list(d.reasons),
            "withheld": list(d.withheld),
        })
    out.sort(key=lambda x: (not x["allowed"], x["name"]))
    return out


def roles_for(user) -> list[str]:
    try:
        return state.catalog().user(getattr(user, "name", user)).role_labels()
    except Exception:
        return []
