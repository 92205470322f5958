"""comfyui_pcpo: the headless PCPO core (no ComfyUI import).

Modules: ``schedules`` (grids), ``kernels`` (Gaussian transitions, log-prob), ``weights`` (native
and proportionate weights), ``plan`` (per-step plan of a rollout), ``advantages``, ``objectives``,
``trajectory`` (the rollout record), ``rewards`` (registry).  Import submodules explicitly; this
package import stays cheap (torch only).
"""
__version__ = "0.1.0"
