"""Guidance objectives: closed forms against float64 autograd, fixtures, reductions, errors."""

from __future__ import annotations

import math
import re

import pytest
import tolerances
import torch
from fixture_utils import case_names, fixture_state_dict, get_case
from tolerances import assert_close, network_depth

import fguide
from fguide.objectives import (
    base_score,
    divergence,
    entropy,
    target_distribution,
)
from fguide.worlds.gmm import BayesClassifier, GaussianMixture

DIVS = ["rkl", "fkl", "js", "hellinger"]


def _logits(
    b: int, n: int, seed: int, near_one_hot: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f = 3 * torch.randn(b, n, generator=g, dtype=torch.float64)
    y = torch.randint(0, n, (b,), generator=g)
    if near_one_hot:
        # rows saturated on the label, on a wrong class, and extremely saturated
        f[0, y[0]] += 40
        f[1, (y[1] + 1) % n] += 40
        f[-1, y[-1]] += 400
    return f, y


F64 = torch.float64


def _scale(logits: torch.Tensor, *results: torch.Tensor) -> float:
    """Log-probabilities carry the logits' rounding (log-sum-exp of values up to max|f|), and
    the results theirs: the larger of max|f| (at least 1) and max|result|."""
    sizes = [max(1.0, tolerances.magnitude(logits))]
    return max(sizes + [tolerances.magnitude(r) for r in results])


def _autograd_coeff(
    obj: fguide.Objective, f: torch.Tensor, y: torch.Tensor, u: float
) -> torch.Tensor:
    f = f.clone().requires_grad_(True)
    s = obj.tilted_score(f, y, u).sum()
    (g,) = torch.autograd.grad(s, f)
    return g


OBJECTIVES = {
    "base": dict(name="base"),
    "base_tau": dict(name="base", tau1=1.7, tau2=0.3),
    "base_tau2_zero": dict(name="base", tau2=0.0),
    "logsoftmax": dict(name="logsoftmax"),
    "entropy_linear": dict(name="entropy"),
    "entropy_cosine": dict(name="entropy", lam_schedule="cosine", lam_max=0.3, lam_min=0.01),
    "entropy_constant": dict(name="entropy", lam_schedule="constant"),
    "rkl": dict(name="rkl", alpha=0.3, eps=0.2),
    "fkl": dict(name="fkl", alpha=0.3, eps=0.2),
    "js": dict(name="js", alpha=0.3, eps=0.2),
    "hellinger": dict(name="hellinger", alpha=0.3, eps=0.2),
    "rkl_onehot": dict(name="rkl", alpha=0.5, eps=1.0),
    "js_onehot": dict(name="js", alpha=0.5, eps=1.0),
    "hellinger_onehot": dict(name="hellinger", alpha=0.5, eps=1.0),
    "user_f_chi2": dict(name="f", alpha=0.2, eps=0.3, generator=lambda t: (t - 1) ** 2),
    "user_f_rkl": dict(name="f", alpha=0.2, eps=0.3, generator=lambda t: -torch.log(t)),
    "tilted": dict(name="tilted"),
    "tilted_group": dict(name="tilted", t_tilt=0.7, group_size=3),
    "composed": dict(name="js", entropy=True, t_tilt=-0.5, group_size=2),
}


@pytest.mark.parametrize("key", list(OBJECTIVES))
@pytest.mark.parametrize(("b", "n"), [(5, 3), (7, 10), (4, 100), (6, 1000)])
@pytest.mark.parametrize("near_one_hot", [False, True])
def test_closed_form_matches_autograd(key: str, b: int, n: int, near_one_hot: bool) -> None:
    obj = fguide.objective(**OBJECTIVES[key])  # type: ignore[arg-type]
    f, y = _logits(b, n, seed=b * 1000 + n, near_one_hot=near_one_hot)
    for u in (0.0, 0.37, 1.0):
        c = obj.coefficients(f, y, u)
        assert torch.isfinite(c).all()
        expected = _autograd_coeff(obj, f, y, u)
        if near_one_hot and key == "user_f_rkl":
            # autograd of -log(p/q) at p = 0 is inf·0 = nan; the closed form floors t instead
            finite = torch.isfinite(expected).all(dim=1)
            c, expected = c[finite], expected[finite]
        # softmaxes and divergences over n classes, forward and back, on the logits' scale
        assert_close(c, expected, F64, depth=2 * (n + 10), scale=_scale(f, expected))


def test_scores_against_textbook_definitions() -> None:
    f, y = _logits(6, 7, seed=3)
    p = torch.softmax(f, -1)
    q = target_distribution(y, 7, 0.3, f)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    m = (p + q) / 2
    depth, scale = 7 + 4, _scale(f)  # a softmax, then sums over 7 classes of a few operations
    assert_close(divergence("rkl", f, q), kl(q, p), F64, depth, scale=scale)
    assert_close(divergence("fkl", f, q), kl(p, q), F64, depth, scale=scale)
    assert_close(divergence("js", f, q), kl(p, m) + kl(q, m), F64, depth, scale=scale)
    hellinger = ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    assert_close(divergence("hellinger", f, q), hellinger, F64, depth, scale=scale)
    assert_close(entropy(f), -(p * p.log()).sum(-1), F64, depth, scale=scale)
    # a user generator evaluates the same divergence as the named one
    user = divergence("f", f, q, generator=lambda t: t * torch.log(t))
    assert_close(user, kl(p, q), F64, depth, scale=scale)


@pytest.mark.parametrize("name", ["entropy", *DIVS])
def test_zero_weight_reduces_exactly_to_base(name: str) -> None:
    f, y = _logits(8, 10, seed=1, near_one_hot=True)
    base = fguide.objective("base").coefficients(f, y)
    kw = dict(lam_max=0.0, lam_min=0.0) if name == "entropy" else dict(alpha=0.0)
    assert torch.equal(fguide.objective(name, **kw).coefficients(f, y, 0.5), base)  # type: ignore[arg-type]


@pytest.mark.parametrize("b", [1, 3, 49])
def test_zero_tilt_reduces_exactly_to_base(b: int) -> None:
    f, y = _logits(b, 10, seed=b)
    base = fguide.objective("base").coefficients(f, y)
    assert torch.equal(fguide.objective("tilted", t_tilt=0.0).coefficients(f, y), base)


def test_tilt_weights_are_mean_one_per_group_and_favour_low_scores() -> None:
    f, y = _logits(10, 5, seed=4)
    obj = fguide.objective("tilted", t_tilt=-0.2, group_size=4)
    w = obj.weights(f, y)
    assert w is not None
    for start in range(0, 10, 4):
        assert_close(w[start : start + 4].mean(), 1.0, F64, depth=2 * 4)  # softmax, mean of 4
    s = base_score(f, y, 1.0, 0.5)
    first = slice(0, 4)
    assert int(w[first].argmax()) == int(s[first].argmin())


@pytest.mark.parametrize(("b", "group"), [(12, 4), (10, 4), (3, 8), (9, None), (16, 1)])
def test_tilt_weights_are_each_groups_own_softmax(b: int, group: int | None) -> None:
    """w_i = |G| exp(t s_i) / Σ_{j∈G} exp(t s_j) over consecutive groups G, the last one
    possibly short, against a per-group computation in plain Python floats."""
    f, y = _logits(b, 5, seed=b)
    t = -0.7
    w = fguide.objective("tilted", t_tilt=t, group_size=group).weights(f, y)
    assert w is not None
    s = base_score(f, y, 1.0, 0.5).tolist()
    g = group or b
    expected: list[float] = []
    for start in range(0, b, g):
        chunk = s[start : start + g]
        z = [math.exp(t * (v - max(chunk, key=lambda u: t * u))) for v in chunk]
        expected += [len(chunk) * v / math.fsum(z) for v in z]
    # exp, a sum of at most b terms and a division: a few ulps of the largest weight
    atol = 4 * b * torch.finfo(w.dtype).eps * float(w.abs().max())
    torch.testing.assert_close(w, torch.tensor(expected, dtype=w.dtype), rtol=0, atol=atol)


def test_lemma1_reverse_kl_decomposition() -> None:
    """−∇ D_KL(q‖p) = Σ q_i ∇f_i − Σ p_j ∇f_j through a nonlinear classifier."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)
    ).double()
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 4, 1])
    f = net(x)
    q = target_distribution(y, 5, 0.4, f)
    (lhs,) = torch.autograd.grad(-divergence("rkl", f, q).sum(), x, retain_graph=True)
    p = torch.softmax(f, -1).detach()
    (rhs,) = torch.autograd.grad((f * (q - p)).sum(), x)
    depth = 2 * (network_depth(net) + 5)  # the net and a softmax over 5 classes, and back
    assert_close(lhs, rhs, F64, depth, scale=_scale(f, rhs))


@pytest.mark.parametrize("key", list(OBJECTIVES))
def test_gaussian_mixture_gradient_closed_form(key: str) -> None:
    """With f_k = log b_k + log N(x; μ_k, σ² I): ∇_x S = Σ_k c_k (μ_k − x)/σ²."""
    mix = GaussianMixture.circle(num_classes=6, radius=2.0, s=0.7, dim=3)
    clf = BayesClassifier(mix, sharpness=1.0)
    g = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (7,), generator=g)
    obj = fguide.objective(**OBJECTIVES[key])  # type: ignore[arg-type]
    grad = fguide.guidance_gradient(clf, x, y, obj, progress=0.25)
    c = obj.coefficients(clf(x), y, 0.25)
    expected = (c[:, :, None] * (mix.means[None] - x[:, None])).sum(1) / mix.s**2
    # log N in 3 dimensions and softmaxes over 6 classes, forward and back; the terms
    # c_k (μ_k − x)/σ² add up to the gradient
    terms = (c.abs()[:, :, None] * (mix.means[None] - x[:, None]).abs()).sum(1) / mix.s**2
    assert_close(grad, expected, F64, depth=2 * (3 + 6 + 10), scale=_scale(clf(x), terms))


def test_guidance_gradient_uses_one_backward_pass() -> None:
    calls = {"n": 0}

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.lin(x)
            out.register_hook(lambda grad: calls.__setitem__("n", calls["n"] + 1))
            return out

    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    fguide.guidance_gradient(Counting(), x, y, fguide.objective("js", entropy=True, t_tilt=-0.2))
    assert calls["n"] == 1


def test_lambda_schedules() -> None:
    lin = fguide.objective("entropy").entropy
    cos = fguide.objective("entropy", lam_schedule="cosine").entropy
    assert lin is not None and cos is not None
    for sched in (lin, cos):  # λ_max + (λ_min − λ_max)·s(u): a few operations (cos included)
        for u, lam in ((0.0, 0.2), (1.0, 0.05), (0.5, 0.125)):
            assert_close(sched.lam(u), lam, F64, depth=5, scale=0.2)
    assert cos.lam(0.25) > lin.lam(0.25)  # cosine stays high longer


def test_paper_defaults() -> None:
    assert fguide.objective("rkl").divergence.alpha == 0.1  # type: ignore[union-attr]
    for name in ("fkl", "js", "hellinger"):
        d = fguide.objective(name).divergence
        assert d is not None and d.alpha == 0.09 and d.eps == 0.1
    base = fguide.objective("base")
    assert (base.tau1, base.tau2) == (1.0, 0.5)
    plain = fguide.objective("logsoftmax")
    assert plain.tau1 == plain.tau2 == 1.0
    tilt = fguide.objective("tilted").tilt
    assert tilt is not None and tilt.t_tilt == -0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="kl2"), "unknown guidance method"),
        (dict(name="js", alpha=-0.1), "alpha"),
        (dict(name="js", eps=1.5), "eps"),
        (dict(name="js", eps=-0.1), "eps"),
        (dict(name="fkl", eps=1.0), "eps = 1"),
        (dict(name="base", tau1=0.0), "tau1"),
        (dict(name="base", tau2=-1.0), "tau2"),
        (dict(name="entropy", lam_max=-1.0), "lam_max"),
        (dict(name="f"), "generator"),
        (dict(name="f", generator=lambda t: t), r"f\(1\) = 0"),
        (dict(name="base", alpha=0.1), "alpha"),
        (dict(name="tilted", group_size=0), "group_size"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fguide.objective(**kwargs)


def test_bad_inputs_raise_naming_the_step() -> None:
    net = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fguide.guidance_gradient(net, x, torch.tensor([0, 3]), fguide.objective())
    bad = torch.nn.Linear(4, 3)
    with torch.no_grad():
        bad.bias[1] = math.inf
    with pytest.raises(ValueError, match="logits are not finite"):
        fguide.guidance_gradient(bad, x, torch.tensor([0, 1]), fguide.objective())


# ---------------------------------------------------------------- fixtures (reference numbers)

FILE = "guidance_gradients.pt"


def _fixture_objectives(cfg: dict) -> dict[str, fguide.Objective]:
    tau1, tau2, alpha, eps, lam = cfg["tau1"], cfg["tau2"], cfg["alpha"], cfg["eps"], cfg["lam"]
    out = {
        "base": fguide.objective("base", tau1=tau1, tau2=tau2),
        "entropy": fguide.objective(
            "entropy", tau1=tau1, tau2=tau2, lam_max=lam, lam_schedule="constant"
        ),
    }
    for name in DIVS:
        out[name] = fguide.objective(name, tau1=tau1, tau2=tau2, alpha=alpha, eps=eps)
    return out


@pytest.mark.parametrize("case_name", case_names(FILE))
def test_guidance_gradients_fixture(case_name: str) -> None:
    case = get_case(FILE, case_name)
    cfg, inp, exp = case["config"], case["inputs"], case["expected"]
    y = inp["y"]
    if case["kind"] == "identity_classifier":
        x = inp["logits"]
        classifier: torch.nn.Module = torch.nn.Identity()
    else:
        x = inp["x"]
        # the network is spelled out in config.classifier: Flatten, Linear(a, h), Tanh, Linear(h, n)
        (d_in, hidden), (hidden2, n_out) = [
            tuple(int(v) for v in m)
            for m in re.findall(r"Linear\((\d+), (\d+)\)", cfg["classifier"])
        ]
        assert hidden == hidden2 and d_in == x[0].numel() and n_out == cfg["num_classes"]
        sd_net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(d_in, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, n_out),
        ).double()
        sd_net.load_state_dict(fixture_state_dict(sd_net, cfg.get("fixture_init_seed", 0)))
        classifier = sd_net.eval()
    logits = classifier(x)
    # the network, then softmaxes and divergences over the classes (forward and back)
    n_cls = cfg["num_classes"]
    net = network_depth(classifier) if isinstance(classifier, torch.nn.Sequential) else 1
    depth, back = net + n_cls + 10, 2 * (net + n_cls + 10)
    scale = _scale(logits)
    assert_close(logits, exp["logits"], F64, net)
    assert_close(torch.softmax(logits, -1), exp["p"], F64, depth, scale=scale)
    q = target_distribution(y, n_cls, cfg["eps"], logits)
    assert_close(q, exp["q_y"], F64, depth)
    assert_close(entropy(logits), exp["H"], F64, depth, scale=scale)
    for name in DIVS:
        assert_close(divergence(name, logits, q), exp[f"D_{name}"], F64, depth, scale=scale)
    for name, obj in _fixture_objectives(cfg).items():
        assert_close(obj.score(logits, y), exp[f"S_{name}"], F64, depth, scale=scale, msg=name)
        grad = fguide.guidance_gradient(classifier, x, y, obj)
        expected = exp[f"grad_{name}"]
        assert_close(grad, expected, F64, back, scale=_scale(logits, expected), msg=name)
    base = _fixture_objectives(cfg)["base"]
    for tilt in exp["tilted"]:
        mean_one = fguide.objective("tilted", tau1=cfg["tau1"], tau2=cfg["tau2"], t_tilt=tilt["t"])
        grad = fguide.guidance_gradient(classifier, x, y, mean_one)
        expected = tilt["grad_tilted_mean_one"]
        tilt_depth = back + 2 * len(y)  # and the softmax over the group
        assert_close(grad, expected, F64, tilt_depth, scale=_scale(logits, expected))
        w = mean_one.weights(logits, y)
        assert w is not None
        assert_close(w / len(w), tilt["weights"], F64, depth + len(y))
        s = base.score(logits, y)
        s_tilted = torch.logsumexp(tilt["t"] * s, 0) / tilt["t"] - math.log(len(s)) / tilt["t"]
        tilted_scale = _scale(logits, s_tilted) * max(1.0, abs(1 / tilt["t"]))
        assert_close(s_tilted, tilt["S_tilted"], F64, depth + len(y), scale=tilted_scale)
        # the paper's sum-to-one gradient is the mean-one gradient divided by the group size
        paper = tilt["grad_tilted_paper"]
        assert_close(grad / len(w), paper, F64, tilt_depth, scale=_scale(logits, paper))


@pytest.mark.parametrize("progress", [0.0, 0.6])
def test_tilt_weights_come_from_the_base_score_not_the_composed_score(progress: float) -> None:
    """METHODS.md §3: w_i = G softmax(t_tilt s)_i with s_i = τ1 f_y − log Σ_j exp(τ2 f_j) the
    base score, whatever terms S adds; c_i = w_i ∂S_i/∂f with S the composed score."""
    tau1, tau2, t_tilt, group = 1.3, 0.4, -0.7, 3
    f, y = _logits(7, 6, seed=11)
    composed = dict(name="js", alpha=0.8, eps=0.2, entropy=True, lam_max=0.9, lam_min=0.3)
    obj = fguide.objective(
        **composed,
        tau1=tau1,
        tau2=tau2,
        t_tilt=t_tilt,
        group_size=group,  # type: ignore[arg-type]
    )
    untilted = fguide.objective(**composed, tau1=tau1, tau2=tau2)  # type: ignore[arg-type]
    # the base score written out (not through fguide.objectives.base_score)
    s = tau1 * f[torch.arange(7), y] - torch.log(torch.exp(tau2 * f).sum(-1))
    expected_w = torch.empty(7, dtype=torch.float64)
    for start in range(0, 7, group):
        e = torch.exp(t_tilt * s[start : start + group])
        expected_w[start : start + group] = len(e) * e / e.sum()
    # the composed score differs enough that weights from it would differ
    s_composed = untilted.score(f, y, progress)
    assert (s_composed - s).abs().max() > 0.1
    w = obj.weights(f, y)
    assert w is not None
    # a softmax over 6 classes, then over a group of 3 (scores on the logits' scale)
    depth, scale = 6 + 3 + 4, _scale(f)
    assert_close(w, expected_w, F64, depth, scale=scale * abs(t_tilt) * group)
    c, w2 = obj.coefficients_and_weights(f, y, progress)
    assert w2 is not None
    assert_close(w2, expected_w, F64, depth, scale=scale * abs(t_tilt) * group)
    fg = f.clone().requires_grad_(True)
    (dS,) = torch.autograd.grad(untilted.score(fg, y, progress).sum(), fg)
    expected_c = expected_w[:, None] * dS
    assert_close(c, expected_c, F64, 2 * depth + 10, scale=_scale(f, expected_c) * group)
    # and through the classifier: g = Σ_i w_i ∇S_i (identity classifier: g = c)
    grad = fguide.guidance_gradient(torch.nn.Identity(), f, y, obj, progress=progress)
    assert_close(grad, expected_c, F64, 2 * depth + 10, scale=_scale(f, expected_c) * group)
