"""Recipes that chain the stages: the speedrun (tokenizer -> data -> pre-training -> report) and its
post-training (teacher traces -> SFT -> GRPO)."""
