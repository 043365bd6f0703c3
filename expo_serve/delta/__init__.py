"""The delta toolkit: read model pairs, build and store Δ, merge θ_sft + (1+α)·Δ."""
