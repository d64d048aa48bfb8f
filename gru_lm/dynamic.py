"""Dynamic evaluation (Krause et al. 2018): the model keeps learning from the text it scores.

The held-out text is read as one stream, in segments of `segment` tokens. Each segment is
scored first, with the weights as they are, and only then used for one gradient step:

    theta <- theta - lr * g / (sqrt(MS) + eps) + decay_i * (theta_0 - theta)

where MS is the mean squared gradient of each weight over batches of the training split
(measured once, with the trained weights), and the decay towards the trained weights
theta_0 is RMS-normalised: decay_i = decay * sqrt(MS_i) / mean(sqrt(MS)), capped at 1, so
weights whose gradients are usually large are pulled back hardest. Every token is scored
exactly once, before the model has seen it. The model's own weights are restored at the end.

Hyper-parameters (lr, decay) are chosen on the validation split (`tune`) and then applied,
unchanged, to the test split: tuning on test would report a number nobody can get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gru_lm.cache import CacheSettings, ContinuousCache
from gru_lm.data import eval_batches
from gru_lm.metrics import evaluating, target_log_probs
from gru_lm.models import detach_state, time_major_loss

EPS = 1e-4
# A small grid around what scored best on The Time Machine (lr 4e-5..8e-5, decay 2e-3,
# segments of 10); the largest lr is also the edge: 1.6e-4 and above scored worse.
LR_GRID = (1e-5, 2e-5, 4e-5, 8e-5)
DECAY_GRID = (0.0, 2e-3)


@dataclass(frozen=True)
class DynamicSettings:
    lr: float
    decay: float
    segment: int = 10


def _no_cudnn():
    """cuDNN runs an RNN's backward only in training mode; adaptation needs gradients with
    dropout off (eval mode), which torch's own RNN code allows. A no-op on the CPU."""
    return torch.backends.cudnn.flags(enabled=False)


def _params(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gradient_ms(model, train: torch.Tensor, num_steps: int, batch_size: int = 32,
                max_batches: int = 40, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor]:
    """Mean squared gradient of every weight over up to `max_batches` training batches."""
    was_training = model.training
    model.eval()  # dropout off: the statistics of the model that will be adapted
    ms = {n: torch.zeros_like(p) for n, p in _params(model)}
    state, count = None, 0
    try:
        for X, Y in eval_batches(train, batch_size, num_steps):
            if count == max_batches:
                break
            X, Y = X.to(device), Y.to(device)
            state = model.begin_state(X.shape[0], device) if state is None else \
                detach_state(state)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad(), _no_cudnn():
                logits, state = model(X, state)
                time_major_loss(logits, Y).backward()
            for n, p in _params(model):
                if p.grad is not None:
                    ms[n] += p.grad.detach() ** 2
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: v / max(1, count) for n, v in ms.items()}


def dynamic_log_probs(model, tokens: torch.Tensor, ms: dict[str, torch.Tensor],
                      settings: DynamicSettings, device: torch.device | str = "cpu",
                      cache: CacheSettings | None = None,
                      temperatures: tuple[float, ...] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log P of tokens[1:] (float32, text order), adapting after each scored segment; and
    with `cache`, the continuous cache's log P of each token (NaN while it is empty), read
    from the adapting model's features. With `temperatures`, the first is instead log P
    under softmax(logits / T) for each T, (len(temperatures), tokens - 1): the model still
    adapts on its own loss, as without them."""
    params = _params(model)
    theta0 = {n: p.detach().clone() for n, p in params}
    scale = {n: ms[n].sqrt() + EPS for n, _ in params}
    mean_rms = torch.cat([ms[n].sqrt().flatten() for n, _ in params]).mean().clamp_min(1e-12)
    pull = {n: (settings.decay * ms[n].sqrt() / mean_rms).clamp(max=1.0) for n, _ in params}
    memory = ContinuousCache((cache.window,), (cache.theta,)) if cache is not None else None
    scored, cached = [], []
    try:
        with evaluating(model):
            X_all, Y_all = tokens[:-1].long().to(device), tokens[1:].long().to(device)
            state = model.begin_state(1, device)
            for i in range(0, len(X_all), settings.segment):
                X = X_all[i:i + settings.segment].unsqueeze(0)  # (1, segment)
                Y = Y_all[i:i + settings.segment].unsqueeze(0)
                model.zero_grad(set_to_none=True)
                with torch.enable_grad(), _no_cudnn():
                    if memory is None:
                        logits, new_state = model(X, detach_state(state))
                    else:
                        logits, new_state, feats = model.forward_features(X, detach_state(state))
                    logp = logits.float().log_softmax(-1).gather(-1, Y.unsqueeze(-1)).squeeze(-1)
                    if temperatures is None:
                        scored.append(logp.detach().cpu().flatten())  # before the update
                    else:
                        scored.append(torch.stack([  # (temperatures, segment)
                            target_log_probs(logits.detach() / t, Y).flatten()
                            for t in temperatures]).cpu())
                    if memory is not None:  # read before the segment's pairs enter it
                        cached.append(memory.read(feats.detach(), Y)[0, 0].cpu().flatten())
                    (-logp.mean()).backward()
                with torch.no_grad():
                    for n, p in params:
                        if p.grad is not None:
                            p.sub_(settings.lr * p.grad / scale[n])
                        p.add_(pull[n] * (theta0[n] - p))
                state = new_state
    finally:
        with torch.no_grad():
            for n, p in params:
                p.copy_(theta0[n])
        model.zero_grad(set_to_none=True)
    if temperatures is None:
        logp = torch.cat(scored) if scored else torch.zeros(0)
    else:
        logp = torch.cat(scored, 1) if scored else torch.zeros(len(temperatures), 0)
    return logp, (torch.cat(cached) if cached else torch.zeros(0)) if memory else None


def dynamic_nll(model, tokens: torch.Tensor, ms: dict[str, torch.Tensor],
                settings: DynamicSettings, device: torch.device | str = "cpu"
                ) -> tuple[float, int]:
    """Total NLL (nats) and token count of `tokens`, adapting after each scored segment."""
    logp, _ = dynamic_log_probs(model, tokens, ms, settings, device)
    return -float(logp.double().sum()), len(logp)


def tune(model, val: torch.Tensor, ms: dict[str, torch.Tensor], device="cpu",
         lr_grid=LR_GRID, decay_grid=DECAY_GRID, segment: int = 10
         ) -> tuple[DynamicSettings, torch.Tensor, list[dict]]:
    """The (lr, decay) with the best val perplexity, val's log P under it, and every trial."""
    trials, best = [], None
    for lr in lr_grid:
        for decay in decay_grid:
            s = DynamicSettings(lr, decay, segment)
            logp, _ = dynamic_log_probs(model, val, ms, s, device)
            nll = -float(logp.double().sum())
            trials.append({"lr": lr, "decay": decay, "val_ppl": math.exp(nll / len(logp))})
            if best is None or nll < best[0]:
                best = (nll, s, logp)
    if best is None:
        raise ValueError("tune needs at least one lr and one decay")
    return best[1], best[2], trials
