"""What is served and where: the model repository (Triton layout), the served-model table and
each model's answer recipe, the placement of members on worker groups."""
