"""Datasets on disk: the project's layout, loading, slideshows of image folders."""
