"""vdm_fast beside other people's code: ``adapters`` (diffusers' and denoising-diffusion-pytorch's
U-Nets as VDM score networks) and ``diffusers_scheduler`` (a vdm_fast schedule behind diffusers'
scheduler API)."""
