# Cap'n Proto schema of the tlog wire protocol and of the stored aggregations.
#
# Wire compatible with zero-os/0-Disk v1.1.0-alpha-7: struct names, field
# ordinals and types are the contract and must never change. Our own additions
# only ever take new, higher ordinals, which old peers ignore.
@0x90d2567e09741796;

# First message of a connection, client to server (no type byte in front).
struct HandshakeRequest {
  version            @0 :UInt32;  # major<<24 | minor<<16 | patch<<8 | stage
  vdiskID            @1 :Text;
  firstSequence      @2 :UInt64;  # sequence the client sends next
  resetFirstSequence @3 :Bool;    # force the vdisk's expected sequence
  # Ours (the reference has no such field, and ignores it): the vdisk's access token,
  # for vdisks configured with "token" access. Old clients do not send it (reads empty).
  token              @4 :Data;
  # Ours: start after the vdisk's last sequence, which the response reports
  # (firstSequence is then ignored). Old clients do not send it (reads false).
  continueSequence   @5 :Bool;
  # Ours: the client may send range operations (TlogBlock.operation 3) if the server
  # answers rangeOps; old clients do not ask (reads false).
  rangeOps           @6 :Bool;
}

# The server's answer to a HandshakeRequest.
struct HandshakeResponse {
  version @0 :UInt32;
  status  @1 :Int8;   # HandshakeStatus: negative is an error (-6 Unauthorized is ours)
  # Ours (old clients ignore them): where the vdisk's log stood when the client
  # connected, in its current epoch (docs/durability.md). lastSequence is the
  # highest sequence stored or received in order; hasLog is false for a vdisk
  # that has nothing yet (lastSequence then reads 0).
  lastSequence @2 :UInt64;
  hasLog       @3 :Bool;
  epoch        @4 :UInt64;
  # Ours: the server keeps a standby of the vdisk in step (slave sync), so a
  # WaitNbdSlaveSync can succeed.
  slaveSync    @5 :Bool;
  # Ours, answered to a client that asked: the server takes range operations.
  rangeOps     @6 :Bool;
}

# Every later server-to-client message.
struct TlogResponse {
  status    @0 :Int8;           # BlockStatus
  sequences @1 :List(UInt64);   # the sequences the status is about
}

# One write (or delete) of one block of a vdisk.
struct TlogBlock {
  sequence  @0 :UInt64;
  index     @1 :Int64;   # block index: byte offset = index * block size
  hash      @2 :Data;    # BLAKE2b-256 of data
  data      @3 :Data;
  timestamp @4 :UInt64;  # nanoseconds since the Unix epoch (set by the client)
  operation @5 :UInt8;   # 1 = set, 2 = delete; ours: 3 = delete the range
                         # [index, index + count), count in data (8 bytes, little endian)
}

# The unit stored in the storage pool: blocks flushed together.
struct TlogAggregation {
  name      @0 :Text;
  size      @1 :UInt64;            # number of blocks
  timestamp @2 :UInt64;            # flush time, ns since the Unix epoch
  vdiskID   @3 :Text;
  blocks    @4 :List(TlogBlock);
  prev      @5 :Data;              # hash of the previous aggregation, 32 zero bytes first
  # Ours: the vdisk's epoch (a reset of its sequence numbering starts the next one;
  # docs/durability.md). 0, the reference's only epoch, is not written.
  epoch     @6 :UInt64;
}

# ForceFlushAtSeq (type byte 2) and WaitNbdSlaveSync (type byte 3).
struct Command {
  type     @0 :UInt8;
  sequence @1 :UInt64;
}
