# Messages as 0-Disk v1.1.0-alpha-7 defines them (field ordinals and types, without our
# additions): what a reference peer reads of our messages, and how pycapnp lays them out
# the way the Go server does (the legacy writer must reproduce that for epoch 0).
@0xc4a1f0d2b3e59a17;

struct HandshakeRequest {
  version            @0 :UInt32;
  vdiskID            @1 :Text;
  firstSequence      @2 :UInt64;
  resetFirstSequence @3 :Bool;
}

struct HandshakeResponse {
  version @0 :UInt32;
  status  @1 :Int8;
}

struct TlogBlock {
  sequence  @0 :UInt64;
  index     @1 :Int64;
  hash      @2 :Data;
  data      @3 :Data;
  timestamp @4 :UInt64;
  operation @5 :UInt8;
}

struct TlogAggregation {
  name      @0 :Text;
  size      @1 :UInt64;
  timestamp @2 :UInt64;
  vdiskID   @3 :Text;
  blocks    @4 :List(TlogBlock);
  prev      @5 :Data;
}
