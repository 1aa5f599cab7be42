"""What every HunyuanImage-3 node module shares: the node category and the model's socket type."""

CATEGORY = "headroom/hunyuan3"
MODEL_TYPE = "HUNYUAN3_MODEL"
