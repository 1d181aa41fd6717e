"""What eviction means for a request, independent of SGLang: trigger, selection, compaction."""
