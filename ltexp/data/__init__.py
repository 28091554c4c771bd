"""Data: sources, long-tail construction, device-resident batches and samplers."""

from ltexp.data.longtail import ClassInfo, LongTailData, build_long_tail, long_tail_counts
from ltexp.data.sources import ImageSource, load_source

__all__ = ["ClassInfo", "ImageSource", "LongTailData", "build_long_tail", "load_source",
           "long_tail_counts", "build_dataset"]


def build_dataset(cfg) -> LongTailData:
    """Load the configured source and make it long-tailed (`cfg` is a `DataConfig`); a packed
    data set (`pack:<file>`) is read as it was packed."""
    from ltexp.data.pack import pack_path, read_pack

    if pack_path(cfg.dataset) is not None:
        return read_pack(cfg)
    source = load_source(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.download)
    return build_long_tail(source, cfg.imb_type, cfg.imb_factor, cfg.val_source, cfg.val_per_class, cfg.data_seed)
