"""Model names -> modules: our YOLOv5-shaped builder, or (when installed) real Ultralytics models from yaml."""
import yolo_models


def build_model(name):
    if name in yolo_models.SIZES:
        return yolo_models.build_yolov5(name)
    # e.g. 'yolov8n', 'yolo11n': Ultralytics builds these from yaml shipped in its wheel, offline
    import torch
    from ultralytics.nn.tasks import DetectionModel
    model = DetectionModel(f'{name}.yaml', verbose=False)
    yolo_models._randomize_bn(model, torch.Generator().manual_seed(0))  # fresh BN would fold to identity
    return model.eval()
