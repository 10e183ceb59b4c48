"""Prove a converted VipLlava repo right against an independent re-implementation of the original ViP-LLaVA."""


def verify_repo(*args, **kwargs):
    """See :func:`verify.api.verify_repo` (imported lazily to keep ``import verify`` cheap)."""
    from .api import verify_repo as _verify_repo

    return _verify_repo(*args, **kwargs)
