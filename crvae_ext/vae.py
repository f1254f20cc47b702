"""LipschitzVAE: three separate Lipschitz MLPs (encoder mean, encoder std, decoder).

Each network is LipLinear + GroupSort layers scaled to its own budget, so its Lipschitz constant
is known from the weights: a = Lip(decoder), b = Lip(mean), c = Lip(std), the inputs of the
certificates in ``crvae_ext.certify``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from . import _checks, bounds
from .bounds import lipschitz_bound
from .certify import (
    CertificateConstants,
    LipschitzConstants,
    RobustnessTarget,
    a_priori_radius,
    design,
)
from .likelihoods import LIKELIHOODS, gaussian_kl, log_likelihood
from .modules import GroupSort, L2BallProjection, LipConv2d, LipConvTranspose2d, LipLinear

LIPSCHITZ_LAYERS = (LipLinear, LipConv2d, LipConvTranspose2d)
_SIGMOID_LIP = 0.25
_RESCALE_SLACK = 1e-6  # above the float32 rounding of k / sigma_hat


class TargetCheck(NamedTuple):
    """The a-priori radius the current weights certify, against the target they must meet."""

    radius: float
    target: RobustnessTarget
    constants: LipschitzConstants
    met: bool


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The modules a plain nn.Sequential applies in order (nested ones flattened)."""
    if type(module) is not nn.Sequential:
        return [module]
    return [leaf for child in module for leaf in _leaves(child)]


def _joint_mean_bound(vae: VAEBase, a: float, b: float) -> float:
    """b_joint <= b with a * b_joint >= Lip(decoder rest) |W_dec1 W_mean_last| Lip(mean rest):
    on the mean path the decoder's first linear map follows the mean net's last one with no
    nonlinearity between, so their product is bounded as one matrix (README)."""
    decoder, mean = _leaves(vae.decoder), _leaves(vae.mean_net)
    if not decoder or not mean or a == 0:
        return b
    first, last = bounds.linear_map(decoder[0]), bounds.linear_map(mean[-1])
    if first is None or last is None:
        return b
    rest = math.prod(lipschitz_bound(m) for m in decoder[1:])
    inner = math.prod(lipschitz_bound(m) for m in mean[:-1])
    joint = rest * bounds.product_norm_bound(first, last, "W_dec1 W_mean_last") * inner
    return min(b, joint / a * (1 + 16 * torch.finfo(torch.float64).eps))


def _group_size(group_size: int, sizes: tuple[int, ...], what: str) -> int:
    """``group_size`` if it is an integer >= 1 that divides every one of ``sizes``."""
    group_size = _checks.integer("group_size", group_size, 1)
    if any(n % group_size for n in sizes):
        raise ValueError(f"group_size={group_size} must divide every {what} {sizes}")
    return group_size


def lipschitz_mlp(
    sizes: Sequence[int], lipschitz: float, group_size: int, **layer_kwargs: Any
) -> nn.Sequential:
    """LipLinear layers with GroupSort between them; each layer gets lipschitz^(1/n)."""
    n_layers = len(sizes) - 1
    per_layer = lipschitz ** (1.0 / n_layers)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(LipLinear(fan_in, fan_out, lipschitz=per_layer, **layer_kwargs))
        if i < n_layers - 1:
            layers.append(GroupSort(group_size))
    return nn.Sequential(*layers)


class VAEBase(nn.Module):
    """Shared VAE behaviour: ``mean_net``, ``std_net`` and ``decoder`` (whose last module is the
    output activation) are set by subclasses, with ``input_dim``, ``latent_dim``, ``likelihood``
    and ``observation_std``."""

    input_dim: int
    likelihood: str
    observation_std: float
    _latent_dim: int

    @property
    def latent_dim(self) -> int:
        """Size m of the latent space (fixed at construction: certificates depend on it)."""
        return self._latent_dim

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        _checks.float_tensor("x", x)
        flat = x.flatten(1) if x.dim() > 2 else x
        if flat.dim() != 2 or flat.shape[1] != self.input_dim:
            raise ValueError(
                f"x must have shape (batch, {self.input_dim}) or (batch, ...) with "
                f"{self.input_dim} features, got {tuple(x.shape)}"
            )
        return flat

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of q(z | x); images are flattened."""
        flat = self._flat(x)
        return self.mean_net(flat), self.std_net(flat)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """g(z): probabilities for Bernoulli-type likelihoods, the mean for "gaussian"."""
        return self.decoder(z)

    def sample_latent(
        self, mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z = mu + sigma * eps, reparameterised; eps ~ N(0, I) unless given."""
        return mu + sigma * (torch.randn_like(mu) if eps is None else eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g(z), mu, sigma) with z ~ q(z | x)."""
        mu, sigma = self.encode(x)
        return self.decode(self.sample_latent(mu, sigma)), mu, sigma

    def elbo(
        self,
        x: torch.Tensor,
        beta: float = 1.0,
        eps: torch.Tensor | None = None,
        *,
        checked: bool = False,
    ) -> torch.Tensor:
        """Per-example ELBO, one reparameterised sample: log p(x | z) - beta KL(q || N(0, I)).

        ``eps`` (batch x latent_dim) fixes the sampling noise, e.g. for reproducible training.
        ``checked=True`` skips ``check_data`` (a host sync), for callers that checked ``x``
        already, as ``train`` does on each host batch before moving it to the device.
        """
        beta = _checks.nonnegative_finite("beta", beta)
        flat = self._flat(x)
        if not checked:
            self.check_data(flat)
        mu, sigma = self.encode(flat)
        if eps is not None and eps.shape != mu.shape:
            raise ValueError(f"eps must have shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
        out = self.decoder[0](self.sample_latent(mu, sigma, eps))
        log_lik = log_likelihood(self.likelihood, out, flat, self.observation_std)
        return log_lik - beta * gaussian_kl(mu, sigma)

    def check_data(self, x: torch.Tensor) -> None:
        """Raise unless ``x`` is data the likelihood describes: finite, and in [0, 1] (pixels)
        for the Bernoulli types. One min/max reduction and host sync per call."""
        low, high = (float(t) for t in torch.aminmax(x.detach()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("x contains NaN or inf")
        if self.likelihood != "gaussian" and not (low >= 0 and high <= 1):
            raise ValueError(
                f"x must lie in [0, 1] for the {self.likelihood} likelihood, got values in "
                f"[{low:g}, {high:g}]: scale the data (e.g. pixels / 255) or use "
                "likelihood='gaussian'"
            )

    def lipschitz_constants(self) -> LipschitzConstants:
        """Sound upper bounds (a, b, c) from the actual weights (float64 SVDs), computed once
        per weight state (see ``certificate_constants``)."""
        return LipschitzConstants(*self.certificate_constants()[:3])

    def certificate_constants(self) -> CertificateConstants:
        """(a, b, c), the joint mean-path bound and the std head's cap: cached, and recomputed
        whenever ``bounds.state_key`` sees the weights change (optimizer steps, fused ones
        included, load_state_dict, in-place edits under no_grad, a new k)."""
        return self._cached("_constants", self._compute_constants)

    def decoder_chain(self):
        """The decoder as ``local.DecoderChain`` (None if it has another shape), cached with
        the constants."""
        from .local import decoder_chain

        return self._cached("_chain", lambda: decoder_chain(self.decoder))

    def _cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, kept in attribute ``name`` until ``bounds.state_key`` moves."""
        key = bounds.state_key(self)
        cached = getattr(self, name, None)
        if cached is None or cached[0] != key:
            cached = (key, compute())
            setattr(self, name, cached)
        return cached[1]

    def invalidate_cache(self) -> None:
        """Forget the cached constants and every layer's eval state: needed only after editing
        a weight through ``.data`` (no version counter sees that)."""
        self._constants = self._chain = None
        for m in self.modules():
            if m is not self and callable(getattr(m, "invalidate_cache", None)):
                m.invalidate_cache()

    def _compute_constants(self) -> CertificateConstants:
        a, b = lipschitz_bound(self.decoder), lipschitz_bound(self.mean_net)
        c = lipschitz_bound(self.std_net)
        cap = self.std_net[-1].radius if isinstance(self.std_net[-1], L2BallProjection) else None
        return CertificateConstants(a, b, c, _joint_mean_bound(self, a, b), cap)


class LipschitzVAE(VAEBase):
    """A VAE with certified robustness (Barrett et al., AISTATS 2022).

    The std head ends in a sigmoid and a projection onto the l2 ball of radius ``sigma_max``
    (S), so |sigma(x)|_2 <= S for every input; the decoder ends in a sigmoid for Bernoulli-type
    likelihoods (``decode`` returns probabilities), in the identity for "gaussian". Sigmoids
    count 1/4 in the bounds, so their MLPs get 4x the budget.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden: Sequence[int] = (512, 512),
        lipschitz_decoder: float = 1.0,
        lipschitz_mean: float = 1.0,
        lipschitz_std: float = 1.0,
        sigma_max: float = 0.1,
        likelihood: str = "continuous_bernoulli",
        method: str = "spectral",
        group_size: int = 2,
        observation_std: float = 1.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        hidden = tuple(_checks.integer("hidden", h, 1) for h in hidden)
        group_size = _group_size(group_size, hidden, "hidden size")
        budgets = self._setup(
            input_dim,
            latent_dim,
            (lipschitz_decoder, lipschitz_mean, lipschitz_std),
            likelihood,
            observation_std,
            hidden=list(hidden),
        )
        kw = {"group_size": group_size, "method": method, "backend": backend}
        enc_sizes = (self.input_dim, *hidden, self.latent_dim)
        self._assemble(
            lipschitz_mlp(enc_sizes, budgets.b, **kw),
            lipschitz_mlp(enc_sizes, budgets.c / _SIGMOID_LIP, **kw),
            lipschitz_mlp(
                (self.latent_dim, *hidden[::-1], self.input_dim), self._dec_budget(), **kw
            ),
            sigma_max,
        )
        self.config.update(method=method, group_size=group_size, backend=backend)

    def _setup(
        self,
        input_dim: int,
        latent_dim: int,
        budgets: tuple[float, float, float],
        likelihood: str,
        observation_std: float,
        **config: Any,
    ) -> LipschitzConstants:
        """Validate and record what every Lipschitz VAE has; ``config`` (the architecture's own
        arguments) goes into ``self.config`` after the sizes."""
        self.input_dim = _checks.integer("input_dim", input_dim, 1)
        self._latent_dim = _checks.integer("latent_dim", latent_dim, 1)
        names = ("lipschitz_decoder", "lipschitz_mean", "lipschitz_std")
        budgets = LipschitzConstants(
            *(_checks.positive_finite(n, b) for n, b in zip(names, budgets, strict=True))
        )
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.observation_std = _checks.positive_finite("observation_std", observation_std)
        self.likelihood = likelihood
        self.budgets = budgets
        self.target: RobustnessTarget | None = None
        self.config = {"input_dim": self.input_dim, "latent_dim": self.latent_dim, **config}
        self.config.update(
            zip(names, budgets, strict=True),
            likelihood=likelihood,
            observation_std=self.observation_std,
        )
        return budgets

    def _dec_budget(self) -> float:
        """The decoder body's budget: a, or 4a before the sigmoid of Bernoulli likelihoods."""
        return self.budgets.a / _SIGMOID_LIP if self.likelihood != "gaussian" else self.budgets.a

    def _assemble(
        self, mean: nn.Module, std_body: nn.Module, decoder_body: nn.Module, sigma_max: float
    ) -> None:
        """The three networks: the std head ends in a sigmoid and the l2-ball projection, the
        decoder in a sigmoid for Bernoulli-type likelihoods."""
        sigma_max = _checks.positive_finite("sigma_max", sigma_max)
        self.config["sigma_max"] = sigma_max
        self.mean_net = mean
        self.std_net = nn.Sequential(std_body, nn.Sigmoid(), L2BallProjection(sigma_max))
        bernoulli = self.likelihood != "gaussian"
        self.decoder = nn.Sequential(decoder_body, nn.Sigmoid() if bernoulli else nn.Identity())

    @classmethod
    def from_target(
        cls,
        input_dim: int,
        latent_dim: int,
        target: RobustnessTarget,
        sigma_max: float = 0.1,
        std_ratio: float = 0.1,
        decoder_ratio: float = 1.0,
        margin: float = 1e-3,
        **kwargs: Any,
    ) -> LipschitzVAE:
        """A VAE whose a-priori certificate meets ``target`` (budgets from ``certify.design``).

        Layers are built ``margin`` (relative) below the budgets, so the float32 power-iteration
        estimate cannot push a fresh model over them; the result is checked (and, if needed,
        repaired) by ``enforce_target`` before it is returned.
        """
        if not 0 <= margin < 1:
            raise ValueError(f"margin must lie in [0, 1), got {margin}")
        budgets = design(target, latent_dim, sigma_max, std_ratio, decoder_ratio)
        a, b, c = (value * (1 - margin) for value in budgets)
        vae = cls(
            input_dim,
            latent_dim,
            lipschitz_decoder=a,
            lipschitz_mean=b,
            lipschitz_std=c,
            sigma_max=sigma_max,
            **kwargs,
        )
        vae.budgets = budgets
        vae.target = target
        vae.enforce_target()
        return vae

    @property
    def sigma_max(self) -> float:
        """S: the radius of the std head's l2-ball projection, the cap on |sigma(x)|_2."""
        return self.std_net[-1].radius

    def verify_target(self) -> TargetCheck:
        """The a-priori radius the weights certify now, and whether it meets the target."""
        if self.target is None:
            raise ValueError("this VAE has no target: build it with LipschitzVAE.from_target")
        constants = self.lipschitz_constants()
        radius = a_priori_radius(
            constants,
            self.target.r,
            self.target.p,
            sigma_max=self.sigma_max,
            latent_dim=self.latent_dim,
        )
        return TargetCheck(radius, self.target, constants, radius >= self.target.radius)

    @torch.no_grad()
    def enforce_target(self) -> TargetCheck:
        """Make the target provably hold: converge every power iteration, then shrink the last
        layer's k of any network whose exact bound still exceeds its budget, until the check
        passes. Returns the passing check; the model is left unchanged when it already passes.
        """
        try:
            check = self.verify_target()
            if check.met:
                return check
        except ValueError:  # e.g. a diverged Björck weight: converging repairs it
            pass
        for module in self.modules():
            if isinstance(module, LIPSCHITZ_LAYERS):
                module.converge_()
        slack = _RESCALE_SLACK
        for _ in range(8):
            check = self.verify_target()
            if check.met:
                return check
            pairs = zip(self._networks(), check.constants, self.budgets, strict=True)
            for net, bound, budget in pairs:
                if bound > budget * (1 - slack):
                    last = [m for m in net.modules() if isinstance(m, LIPSCHITZ_LAYERS)][-1]
                    last.lipschitz = last.lipschitz * budget / bound * (1 - slack)
            slack *= 10
        raise RuntimeError(f"could not enforce the target: {check}")

    def _networks(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.decoder, self.mean_net, self.std_net


def lipschitz_conv_encoder(
    image_shape: tuple[int, int, int],
    channels: Sequence[int],
    out_features: int,
    lipschitz: float,
    group_size: int,
    backend: str | None = None,
) -> nn.Sequential:
    """Flat images -> (4x4, stride 2, padding 1) LipConv2d + GroupSort over channels per entry
    of ``channels`` (halving H and W) -> LipLinear; each layer gets lipschitz^(1/n)."""
    per_layer = lipschitz ** (1.0 / (len(channels) + 1))
    c, h, w = image_shape
    layers: list[nn.Module] = [nn.Unflatten(1, image_shape)]
    for ch in channels:
        layers += [
            LipConv2d(c, ch, 4, stride=2, padding=1, lipschitz=per_layer, input_size=(h, w)),
            GroupSort(group_size, dim=1, backend=backend),
        ]
        c, h, w = ch, h // 2, w // 2
    layers += [
        nn.Flatten(),
        LipLinear(c * h * w, out_features, lipschitz=per_layer, backend=backend),
    ]
    return nn.Sequential(*layers)


def lipschitz_conv_decoder(
    latent_dim: int,
    image_shape: tuple[int, int, int],
    channels: Sequence[int],
    lipschitz: float,
    group_size: int,
    backend: str | None = None,
) -> nn.Sequential:
    """The encoder's mirror: LipLinear -> GroupSort -> (4x4, stride 2) LipConvTranspose2d per
    entry of ``channels`` (doubling H and W) -> flat images; each layer gets lipschitz^(1/n)."""
    per_layer = lipschitz ** (1.0 / (len(channels) + 1))
    scale = 2 ** len(channels)
    c, h, w = channels[-1], image_shape[1] // scale, image_shape[2] // scale
    layers: list[nn.Module] = [
        LipLinear(latent_dim, c * h * w, lipschitz=per_layer, backend=backend),
        nn.Unflatten(1, (c, h, w)),
        GroupSort(group_size, dim=1, backend=backend),
    ]
    outs = [*channels[-2::-1], image_shape[0]]
    for i, ch in enumerate(outs):
        layers.append(
            LipConvTranspose2d(
                c, ch, 4, stride=2, padding=1, lipschitz=per_layer, input_size=(h, w)
            )
        )
        if i < len(outs) - 1:
            layers.append(GroupSort(group_size, dim=1, backend=backend))
        c, h, w = ch, 2 * h, 2 * w
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class ConvLipschitzVAE(LipschitzVAE):
    """A certified VAE with convolutional networks for images: encoder heads of stride-2
    LipConv2d layers and a LipConvTranspose2d decoder, each bounded by its exact operator
    norm (``crvae_ext.conv_bounds``). Inputs are flat (batch x C*H*W) or images, as for
    LipschitzVAE; ``from_target``, ``certify`` and checkpoints work the same way.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        channels: Sequence[int] = (32, 64),
        image_shape: Sequence[int] | None = None,
        lipschitz_decoder: float = 1.0,
        lipschitz_mean: float = 1.0,
        lipschitz_std: float = 1.0,
        sigma_max: float = 0.1,
        likelihood: str = "continuous_bernoulli",
        group_size: int = 2,
        observation_std: float = 1.0,
        backend: str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        channels = tuple(_checks.integer("channels", c, 1) for c in channels)
        if not channels:
            raise ValueError("channels must name at least one convolution's output channels")
        group_size = _group_size(group_size, channels, "channel count")
        shape = _image_shape(_checks.integer("input_dim", input_dim, 1), image_shape, channels)
        budgets = self._setup(
            input_dim,
            latent_dim,
            (lipschitz_decoder, lipschitz_mean, lipschitz_std),
            likelihood,
            observation_std,
            channels=list(channels),
            image_shape=list(shape),
        )

        def encoder(budget: float) -> nn.Sequential:
            return lipschitz_conv_encoder(
                shape, channels, self.latent_dim, budget, group_size, backend
            )

        self._assemble(
            encoder(budgets.b),
            encoder(budgets.c / _SIGMOID_LIP),
            lipschitz_conv_decoder(
                self.latent_dim, shape, channels, self._dec_budget(), group_size, backend
            ),
            sigma_max,
        )
        self.config.update(group_size=group_size, backend=backend)


def _image_shape(
    input_dim: int, image_shape: Sequence[int] | None, channels: Sequence[int]
) -> tuple[int, int, int]:
    """(C, H, W): given, or (1, s, s) for square grey images; H and W must halve
    len(channels) times exactly."""
    if image_shape is None:
        side = math.isqrt(input_dim)
        if side * side != input_dim:
            raise ValueError(
                f"input_dim={input_dim} is not a square image: give image_shape=(C, H, W)"
            )
        image_shape = (1, side, side)
    shape = tuple(_checks.integer("image_shape", d, 1) for d in image_shape)
    if len(shape) != 3 or math.prod(shape) != input_dim:
        raise ValueError(f"image_shape must be (C, H, W) with C*H*W = {input_dim}, got {shape}")
    scale = 2 ** len(channels)
    if shape[1] % scale or shape[2] % scale:
        raise ValueError(
            f"image_shape {shape}: H and W must be divisible by 2^{len(channels)} = {scale} "
            f"(one stride-2 convolution per entry of channels={tuple(channels)})"
        )
    return shape  # type: ignore[return-value]


def plain_mlp(sizes: Sequence[int]) -> nn.Sequential:
    """nn.Linear layers with ReLU between them (the unconstrained baseline)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class StandardVAE(VAEBase):
    """The unconstrained baseline: the same MLP shapes of nn.Linear + ReLU, a softplus std head.

    Its constants are still sound (spectral norms of its weights) but large, so its certificates
    are near zero: the comparison the paper draws.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden: Sequence[int] = (512, 512),
        likelihood: str = "continuous_bernoulli",
        observation_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.input_dim = _checks.integer("input_dim", input_dim, 1)
        self._latent_dim = _checks.integer("latent_dim", latent_dim, 1)
        hidden = tuple(_checks.integer("hidden", h, 1) for h in hidden)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.likelihood = likelihood
        self.observation_std = _checks.positive_finite("observation_std", observation_std)
        self.config = {
            "input_dim": self.input_dim,
            "latent_dim": self.latent_dim,
            "hidden": list(hidden),
            "likelihood": likelihood,
            "observation_std": self.observation_std,
        }
        enc_sizes = (self.input_dim, *hidden, self.latent_dim)
        self.mean_net = plain_mlp(enc_sizes)
        self.std_net = nn.Sequential(plain_mlp(enc_sizes), nn.Softplus())
        self.decoder = nn.Sequential(
            plain_mlp((self.latent_dim, *hidden[::-1], self.input_dim)),
            nn.Identity() if likelihood == "gaussian" else nn.Sigmoid(),
        )
