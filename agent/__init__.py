"""iomt-edge-agent: DICOM scans in over MQTT, int8 image translation on the node, sealed
results out."""

__version__ = "0.1.0"
