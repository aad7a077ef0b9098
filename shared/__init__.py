"""What every conveyor component uses: models, codec, settings, errors, Redis keys, the state store."""
