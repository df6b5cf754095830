"""What every rankguard service speaks: configs, wire schemas, problems, prompts, model loading."""
