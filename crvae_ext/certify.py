"""Certify API: certificates per input and a priori, design from a target, Monte-Carlo checks.

All Lipschitz constants come from the weights (``lipschitz_constants()``: float64 SVD bounds);
every model is certified in eval mode, the mode whose function the constants describe.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _checks, radius
from ._context import eval_mode
from ._distributed import world as _world
from .radius import certified_radius

__all__ = [
    "CertificateConstants",
    "CertifyResult",
    "LipschitzConstants",
    "ProbabilityEstimate",
    "RobustnessTarget",
    "a_priori_radius",
    "certified_radius",
    "certify",
    "design",
    "robustness_probability",
    "sigma_cap",
]


class LipschitzConstants(NamedTuple):
    """Sound upper bounds (l2 -> l2): a = decoder, b = encoder mean, c = encoder std."""

    a: float
    b: float
    c: float


@dataclass(frozen=True)
class RobustnessTarget:
    """Wanted up front: every input r-robust with probability p within ``radius``."""

    radius: float
    r: float
    p: float = 0.5

    def __post_init__(self) -> None:
        _checks.positive_finite("radius", self.radius)
        _checks.positive_finite("r", self.r)
        radius._check_probability(self.p)


def _model_constants(model: Any) -> LipschitzConstants:
    if not callable(getattr(model, "lipschitz_constants", None)):
        raise TypeError(
            f"cannot bound {type(model).__name__}: certify needs lipschitz_constants() "
            "(a LipschitzVAE, or a model providing sound (a, b, c))"
        )
    return LipschitzConstants(*model.lipschitz_constants())


def sigma_cap(model: Any) -> float:
    """The cap S on |sigma(x)|_2 a model enforces: its std head's l2-ball projection radius."""
    from .modules import L2BallProjection

    std_net = getattr(model, "std_net", None)
    caps = (
        [m.radius for m in std_net.modules() if isinstance(m, L2BallProjection)]
        if isinstance(std_net, torch.nn.Module)
        else []
    )
    if not caps or not isinstance(std_net[-1], L2BallProjection):
        raise TypeError(
            f"a-priori certificates need a std head that ends in an L2BallProjection "
            f"(a LipschitzVAE); {type(model).__name__} caps no |sigma|_2"
        )
    return std_net[-1].radius


def a_priori_radius(
    model_or_constants: Any,
    r: float,
    p: float = 0.5,
    *,
    sigma_max: float | None = None,
    latent_dim: int | None = None,
    bound: str = "best",
) -> float:
    """A radius valid for EVERY input, from (a, b, c) and the sigma cap S (s = s_inf = S).

    Takes a model (its constants from the weights, S from its std head's projection, m from
    its latent size; no overrides) or an (a, b, c) triple with ``sigma_max`` and ``latent_dim``.
    """
    if isinstance(model_or_constants, (tuple, list)):
        if len(model_or_constants) != 3:
            raise ValueError("constants must be an (a, b, c) triple")
        constants = LipschitzConstants(*model_or_constants)
        if sigma_max is None or latent_dim is None:
            raise ValueError("sigma_max and latent_dim are needed with bare constants")
    else:
        if sigma_max is not None or latent_dim is not None:
            raise ValueError(
                "sigma_max and latent_dim are read from the model; pass bare (a, b, c) "
                "constants to choose them"
            )
        cap = sigma_cap(model_or_constants)
        constants = _model_constants(model_or_constants)
        sigma_max, latent_dim = cap, model_or_constants.latent_dim
    cap = _checks.positive_finite("sigma_max", sigma_max)
    return float(certified_radius(*constants, cap, cap, r, p, latent_dim, bound))


def design(
    target: RobustnessTarget,
    latent_dim: int,
    sigma_max: float,
    std_ratio: float = 0.1,
    decoder_ratio: float = 1.0,
    bound: str = "best",
) -> LipschitzConstants:
    """Lipschitz budgets (a, b, c) = (decoder_ratio L, L, std_ratio L), L as large as possible
    while the a-priori certificate still reaches ``target.radius``.

    The radius falls as L grows, so L is found by bisection and only a checked L is returned.
    A small ``std_ratio`` spends little of the budget on the std head (c costs radius).
    """
    if not isinstance(target, RobustnessTarget):
        raise TypeError(f"target must be a RobustnessTarget, got {type(target).__name__}")
    std_ratio = _checks.positive_finite("std_ratio", std_ratio)
    decoder_ratio = _checks.positive_finite("decoder_ratio", decoder_ratio)

    def reaches(scale: float) -> bool:
        budgets = (decoder_ratio * scale, scale, std_ratio * scale)
        got = a_priori_radius(
            budgets, target.r, target.p, sigma_max=sigma_max, latent_dim=latent_dim, bound=bound
        )
        return got >= target.radius

    lo, hi = 1.0, 1.0
    while not reaches(lo):
        lo /= 2
        if lo < 1e-12:
            raise ValueError(f"no Lipschitz budget reaches {target}")
    while reaches(hi):
        hi *= 2
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if reaches(mid) else (lo, mid)
    return LipschitzConstants(decoder_ratio * lo, lo, std_ratio * lo)


MODES = ("fast", "global", "tight")
LOCAL_EPS = 0.05  # the share of 1 - p that mode "tight" spends on the latent ball's event
_LOCAL_STEPS = 8  # geometric bisection steps above the fast radius (to a factor 4^(1/256))
_LOCAL_CHUNK = 256  # inputs searched together (the local bound's matrices grow with the chunk)


class CertificateConstants(NamedTuple):
    """Everything the per-input certificates need from the weights, all sound upper bounds.

    (a, b, c) as in ``LipschitzConstants``; ``b_joint`` <= b bounds the mean path with the mean
    net's last linear map and the decoder's first taken as one matrix (a * b_joint >=
    Lip(decoder rest) |W_dec1 W_mean_last| Lip(mean rest)); ``sigma_cap`` is S when the std head
    ends in a projection onto the l2 ball of radius S (else None).
    """

    a: float
    b: float
    c: float
    b_joint: float
    sigma_cap: float | None


@dataclass
class CertifyResult:
    """Per-input certified radii, the constants used and which bound won for each input
    ("markov", "chi2", "paper-..."; "local-<bound>" where mode "tight"'s local bound raised it).

    ``constants`` are the model's (a, b, c); modes "fast" and "tight" use ``b_used`` (the joint
    mean-path bound) and a projection-aware c computed per input from ``v_norm`` = |v(x)|, the
    std head's output before its projection; "tight" adds the decoder's local bound.
    """

    radius: torch.Tensor
    markov: torch.Tensor
    chi2: torch.Tensor
    winner: tuple[str, ...]
    constants: LipschitzConstants
    sigma_l2: torch.Tensor
    sigma_inf: torch.Tensor
    r: float
    p: float
    bound: str
    mode: str = "global"
    b_used: float | None = None
    v_norm: torch.Tensor | None = None


def _encoder_of(model: Any) -> Any:
    for attr in ("encode", "decode"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"cannot certify {type(model).__name__}: it has no {attr}()")
    return model


def _model_certificate_constants(model: Any, mode: str) -> CertificateConstants:
    """The model's cached ``certificate_constants()`` where it has them, else from its (a, b, c)
    with nothing tighter (a model of another kind)."""
    own = getattr(model, "certificate_constants", None)
    if mode != "global" and callable(own):
        return own()
    a, b, c = _model_constants(model)
    return CertificateConstants(a, b, c, b, None)


def _encode_for_certificate(model: Any, x: torch.Tensor, cap: float | None, with_mean: bool):
    """(sigma, |v(x)| or None, mu or None): only the std head runs where the model's ``encode``
    is the library's and the mean is not needed; with a capped head its pre-projection output
    too."""
    from .vae import VAEBase

    if type(model).encode is not VAEBase.encode:
        mu, sigma = model.encode(x)
        return sigma, None, mu if with_mean else None
    flat = model._flat(x)
    mu = model.mean_net(flat) if with_mean else None
    if cap is None:
        return model.std_net(flat), None, mu
    v = model.std_net[:-1](flat)
    return model.std_net[-1](v), v.detach().to(torch.float64).norm(dim=-1), mu


def _sigma_batch(model, x, cap: float | None, with_mean: bool = False):
    """(|sigma|_2, max_i sigma_i, |v(x)| or None, latent size, mu or None) of one batch, on the
    model's device; the results in float64 on the CPU, where the certificates are computed."""
    device = next((p.device for p in model.parameters()), x.device)
    x = x.to(device)
    with eval_mode(model), torch.no_grad():
        sigma, v_norm, mu = _encode_for_certificate(model, x, cap, with_mean)
    sigma = sigma.detach().to("cpu", torch.float64)
    v_norm = None if v_norm is None else v_norm.cpu()
    mu = None if mu is None else mu.detach().to("cpu", torch.float64)
    return sigma.norm(dim=-1), sigma.amax(dim=-1), v_norm, sigma.shape[-1], mu


def certify(
    vae: Any,
    data: Any,
    r: float,
    p: float = 0.5,
    bound: str = "best",
    mode: str = "fast",
    batch_size: int = 256,
    progress: bool = False,
) -> CertifyResult:
    """Certified radius of every input of ``data``: a tensor of inputs, or a Dataset or
    DataLoader yielding inputs (or (input, label) pairs), in batches of ``batch_size`` with a
    tqdm bar when ``progress``. Under torch.distributed (torchrun) each process certifies its
    share of a Dataset and every process gets all the results.

    mode "fast" (default): the mean path's joint bound and a projection-aware std-head
    constant per input, closed forms (README, "Tighter per-input certificates"); "tight": also
    the decoder's Lipschitz bound over the latent ball the samples stay in (README, "Local
    decoder bound"; tens of inputs per second); "global": the model's (a, b, c) for every
    input. The constants are computed once per weight state and cached.
    """
    model = _encoder_of(vae)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    batch_size = _checks.integer("batch_size", batch_size, 1)
    consts = _model_certificate_constants(model, mode)
    chain = model.decoder_chain() if mode == "tight" and hasattr(model, "decoder_chain") else None
    local = chain is not None and bound != "paper" and p + LOCAL_EPS < 1
    parts = [
        _sigma_batch(model, x, consts.sigma_cap, with_mean=local)
        for x in _batches(data, batch_size, progress)
    ]
    if not parts:
        raise ValueError("data holds no inputs to certify")
    s, s_inf = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
    v_norm = None if parts[0][2] is None else torch.cat([part[2] for part in parts])
    mu = torch.cat([part[4] for part in parts]) if local else None
    s, s_inf, v_norm, mu = _gather(data, s, s_inf, v_norm, mu)
    b = consts.b if mode == "global" else consts.b_joint
    projection = None if v_norm is None else (consts.sigma_cap, v_norm)
    m = parts[0][3]
    result = radius.radii(consts.a, b, consts.c, s, s_inf, r, p, m, bound, projection)
    found = None
    if local:
        found = torch.cat([
            _local_radii(chain, consts, s[i], s_inf[i], mu[i],
                         None if projection is None else (projection[0], projection[1][i]),
                         r, p, m, result.radius[i], bound)
            for i in torch.arange(len(s)).split(_LOCAL_CHUNK)
        ])  # fmt: skip
        result = radius.Radii(torch.maximum(result.radius, found), result.markov, result.chi2)
    names = ("paper-markov", "paper-inglot") if bound == "paper" else ("markov", "chi2")
    if bound in ("markov", "chi2"):
        winner = (bound,) * len(s)
    else:
        wins = (result.markov >= result.chi2).tolist()
        winner = tuple(names[0] if w else names[1] for w in wins)
    if found is not None:  # radii the decoder's local bound raised: "local-" + the bound used
        raised = (found > torch.maximum(result.markov, result.chi2)).tolist()
        winner = tuple(f"local-{bound}" if up else w for up, w in zip(raised, winner, strict=True))
    return CertifyResult(
        result.radius,
        result.markov,
        result.chi2,
        winner,
        LipschitzConstants(consts.a, consts.b, consts.c),
        s,
        s_inf,
        float(r),
        float(p),
        bound,
        mode,
        b,
        v_norm,
    )


def _local_radii(chain, consts, s, s_inf, mu, projection, r, p, m, start, bound) -> torch.Tensor:
    """Mode "tight" (README, "Local decoder bound"): with q the chi-square quantile of tail
    eps/2, both latent samples lie in B(mu(x), b t + (s_inf + c_eff t) sqrt(q)) except with
    probability eps; on that event the decoder moves by at most a_B |z' - z|, a_B its local
    bound over the ball, so a certificate with (a_B, b, c_eff(t)) at probability p + eps holds at
    p. Any t that passes certifies every smaller one (a_B of a ball holds on smaller balls):
    a geometric bisection above the "fast" radius ``start`` keeps the largest t that passed."""
    from .local import local_lipschitz

    eps = LOCAL_EPS
    root_q = math.sqrt(radius.chi2_quantile_upper(m, eps / 2))
    a, b, c = (torch.tensor(v, dtype=torch.float64) for v in (consts.a, consts.b, consts.c))

    def ok(t: torch.Tensor) -> torch.Tensor:
        c_t = radius.effective_c(t, c, projection)
        reach = b * t + (s_inf + c_t * t) * root_q
        a_local = torch.minimum(local_lipschitz(chain, mu, reach), a)  # both are sound
        return radius.passes(t, a_local, b, c_t, s, s_inf, r, p + eps, m, bound)

    finite = torch.isfinite(start) & (start > 0)
    lo = torch.where(finite, start, torch.zeros_like(start))
    best = torch.zeros_like(lo)
    hi = lo * 4
    for _ in range(_LOCAL_STEPS):
        mid = torch.sqrt(lo * hi)
        passed = ok(mid) & finite
        best = torch.where(passed, mid, best)
        lo, hi = torch.where(passed, mid, lo), torch.where(passed, hi, mid)
    return best


def _batches(data: Any, batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    """Checked input batches of ``data`` (this process's share under torch.distributed)."""
    from torch.utils.data import DataLoader, Dataset, Subset
    from tqdm.auto import tqdm

    if isinstance(data, torch.Tensor):
        _checks.finite_tensor("x", _checks.float_tensor("x", data))
        batches = data.split(batch_size) if len(data) else []
    elif isinstance(data, (Dataset, DataLoader)):
        if isinstance(data, Dataset):
            rank, world = _world()
            share = Subset(data, range(rank, len(data), world)) if world > 1 else data
            data = DataLoader(share, batch_size=batch_size, shuffle=False)
        batches = (item[0] if isinstance(item, (tuple, list)) else item for item in data)
    else:
        raise TypeError(
            f"data must be a tensor of inputs, a Dataset or a DataLoader, got {type(data).__name__}"
        )
    for x in tqdm(batches, desc="certify", disable=not progress, leave=False):
        if not isinstance(data, torch.Tensor):
            _checks.finite_tensor("x", _checks.float_tensor("x", x))
        yield x


def _gather(data, *values):
    """Every process's share of a Dataset, in the dataset's order (identity with one process).
    The radii are computed after the gather: each process certifies every input."""
    from torch.utils.data import Dataset

    world = _world()[1]
    if world == 1 or not isinstance(data, Dataset):
        return values
    import torch.distributed as dist

    mine = [t.cpu() if t is not None else None for t in values]
    shares: list = [None] * world
    dist.all_gather_object(shares, mine)
    merged = []
    for i, value in enumerate(mine):
        if value is None:
            merged.append(None)
            continue
        out = torch.empty((len(data), *value.shape[1:]), dtype=value.dtype)
        for rank, share in enumerate(shares):
            out[rank::world] = share[i]
        merged.append(out)
    return tuple(merged)


@dataclass
class ProbabilityEstimate:
    """Monte-Carlo P(|g(z') - g(z)| <= r) per input with a Clopper-Pearson interval."""

    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    successes: torch.Tensor
    n_samples: int
    confidence: float


def clopper_pearson(successes: np.ndarray, n: int, confidence: float) -> tuple[np.ndarray, ...]:
    """Exact two-sided binomial interval (scipy's beta quantiles; scipy is imported here only,
    so that ``import crvae_ext`` stays light)."""
    from scipy import stats

    alpha = 1 - confidence
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        upper = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return lower, upper


def robustness_probability(
    vae: Any,
    x: torch.Tensor,
    delta: torch.Tensor,
    r: float,
    n_samples: int = 1000,
    confidence: float = 0.95,
    chunk: int = 256,
) -> ProbabilityEstimate:
    """Estimate P(|g(z') - g(z)| <= r), z ~ q(.|x), z' ~ q(.|x + delta) independent."""
    model = _encoder_of(vae)
    r = _checks.positive_finite("r", r)
    n_samples = _checks.integer("n_samples", n_samples, 1)
    chunk = _checks.integer("chunk", chunk, 1)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    _checks.finite_tensor("x", _checks.float_tensor("x", x))
    _checks.finite_tensor("delta", _checks.float_tensor("delta", delta))
    if delta.shape != x.shape:
        raise ValueError(f"delta must be a tensor of x's shape {tuple(x.shape)}")
    successes = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    with eval_mode(model), torch.no_grad():
        mu, sigma = model.encode(x)
        mu2, sigma2 = model.encode(x + delta)
        for start in range(0, n_samples, chunk):
            n = min(chunk, n_samples - start)
            z = mu + sigma * torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device)
            z2 = mu2 + sigma2 * torch.randn(n, *mu.shape, dtype=mu.dtype, device=mu.device)
            change = model.decode(z2.flatten(0, 1)) - model.decode(z.flatten(0, 1))
            close = change.flatten(1).norm(dim=1).view(n, -1) <= r
            successes += close.sum(0)
    lower, upper = clopper_pearson(successes.cpu().numpy(), n_samples, confidence)
    successes = successes.cpu()
    return ProbabilityEstimate(
        successes.double() / n_samples,
        torch.as_tensor(lower, dtype=torch.float64),
        torch.as_tensor(upper, dtype=torch.float64),
        successes,
        n_samples,
        confidence,
    )
