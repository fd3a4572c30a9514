"""The model service: LVLM replicas behind Ray Serve (today the PPO scorer)."""
