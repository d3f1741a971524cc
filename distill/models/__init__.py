"""The model side of a run: the denoiser over a diffusers network, its LoRA adapters, the teacher's ODE samplers,
the student's k-step schedules and rollouts, and the JVP of sCM/rCM."""
