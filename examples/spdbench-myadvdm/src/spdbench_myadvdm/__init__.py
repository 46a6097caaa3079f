"""An AdvDM-like attack as a third-party spdbench plugin."""
import torch

import spdbench


class MyAdvDM(spdbench.GradientAttack):
    """Raise the diffusion model's denoising error on x + delta (an AdvDM-like example plugin).

    Args: prompt ("a photo"), plus GradientAttack's loop parameters (steps, step_size, optimizer,
    schedule, init, stop_below). objective_loss: per image, the mean squared error of the UNet's
    noise prediction at a random timestep, maximized.
    """

    maximize = True    # higher denoising error = stronger protection
    stochastic = True  # one random (t, noise) draw per step: the loss curve is noisy
    defaults = {**spdbench.GradientAttack.defaults, "init": "random", "prompt": "a photo"}

    def objective_loss(self, target, adv, clean, generator=None):
        if generator is None:  # objective(): fixed draws, so the evaluation is deterministic
            generator = torch.Generator().manual_seed(0)
        z = target.latents(adv)  # scaled posterior mean, differentiable
        t = torch.randint(0, target.num_train_timesteps, (len(adv),), generator=generator)
        noise = torch.randn(z.shape, generator=generator).to(z.device)
        cond = target.encode_prompt([self.prompt])
        pred = target.predict_noise(target.add_noise(z, noise, t), t, cond)
        return (pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
