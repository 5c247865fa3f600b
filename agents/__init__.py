"""What lives inside one agent: model, losses, the Agent, the Ray actor that hosts agents."""
