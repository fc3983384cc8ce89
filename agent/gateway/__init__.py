"""The DICOM gateway: C-STORE from modalities and PACS into the site's scan topic.

| module | job |
|---|---|
| ``scp`` | the Storage SCP (the only pynetdicom importer): AE allow-list, contexts, C-ECHO |
| ``intake`` | one instance: checks, the DIMSE status to answer, the refusal log line |
| ``forwarder`` | publish at QoS 1 and wait for the PUBACK, or spool; the drainer; receipts |
| ``spool`` | the durable spool (SQLite, synchronous=FULL) of instances not yet accepted |
| ``service`` | ``iomt-agent gateway``: the parts wired, systemd notify, clean stop |
"""
