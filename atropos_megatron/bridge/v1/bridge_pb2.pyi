from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]

class WeightTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_TRANSPORT_UNSPECIFIED: _ClassVar[WeightTransport]
    WEIGHT_TRANSPORT_GRPC: _ClassVar[WeightTransport]
    WEIGHT_TRANSPORT_DISTRIBUTED: _ClassVar[WeightTransport]
    WEIGHT_TRANSPORT_DISK: _ClassVar[WeightTransport]
DTYPE_UNSPECIFIED: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_BOOL: DType
DTYPE_UINT8: DType
DTYPE_INT16: DType
WEIGHT_TRANSPORT_UNSPECIFIED: WeightTransport
WEIGHT_TRANSPORT_GRPC: WeightTransport
WEIGHT_TRANSPORT_DISTRIBUTED: WeightTransport
WEIGHT_TRANSPORT_DISK: WeightTransport

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterRunRequest(_message.Message):
    __slots__ = ("request_id", "run_name", "batch_size", "max_token_len", "starting_step", "num_steps", "checkpoint_dir", "save_checkpoint_interval", "vocab_size", "committed_step", "num_hidden_layers", "num_experts_per_tok")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LEN_FIELD_NUMBER: _ClassVar[int]
    STARTING_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIR_FIELD_NUMBER: _ClassVar[int]
    SAVE_CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_PER_TOK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_name: str
    batch_size: int
    max_token_len: int
    starting_step: int
    num_steps: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    vocab_size: int
    committed_step: int
    num_hidden_layers: int
    num_experts_per_tok: int
    def __init__(self, request_id: _Optional[str] = ..., run_name: _Optional[str] = ..., batch_size: _Optional[int] = ..., max_token_len: _Optional[int] = ..., starting_step: _Optional[int] = ..., num_steps: _Optional[int] = ..., checkpoint_dir: _Optional[str] = ..., save_checkpoint_interval: _Optional[int] = ..., vocab_size: _Optional[int] = ..., committed_step: _Optional[int] = ..., num_hidden_layers: _Optional[int] = ..., num_experts_per_tok: _Optional[int] = ...) -> None: ...

class RegisterRunResponse(_message.Message):
    __slots__ = ("trainer_uuid", "starting_step", "replayed_batches")
    TRAINER_UUID_FIELD_NUMBER: _ClassVar[int]
    STARTING_STEP_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    trainer_uuid: str
    starting_step: int
    replayed_batches: int
    def __init__(self, trainer_uuid: _Optional[str] = ..., starting_step: _Optional[int] = ..., replayed_batches: _Optional[int] = ...) -> None: ...

class GetBatchRequest(_message.Message):
    __slots__ = ("request_id", "wait_s", "redeliver_unacked", "peek")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    REDELIVER_UNACKED_FIELD_NUMBER: _ClassVar[int]
    PEEK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    wait_s: float
    redeliver_unacked: bool
    peek: bool
    def __init__(self, request_id: _Optional[str] = ..., wait_s: _Optional[float] = ..., redeliver_unacked: _Optional[bool] = ..., peek: _Optional[bool] = ...) -> None: ...

class TrainingBatch(_message.Message):
    __slots__ = ("batch_id", "step", "num_sequences", "num_groups", "seq_lens", "input_ids", "labels", "loss_mask", "scores", "group_index", "advantages", "inference_logprobs", "ref_logprobs", "groups", "fetched_unix_s", "routed_experts")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    GROUP_INDEX_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ROUTED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    step: int
    num_sequences: int
    num_groups: int
    seq_lens: Tensor
    input_ids: Tensor
    labels: Tensor
    loss_mask: Tensor
    scores: Tensor
    group_index: Tensor
    advantages: Tensor
    inference_logprobs: Tensor
    ref_logprobs: Tensor
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    fetched_unix_s: float
    routed_experts: Tensor
    def __init__(self, batch_id: _Optional[str] = ..., step: _Optional[int] = ..., num_sequences: _Optional[int] = ..., num_groups: _Optional[int] = ..., seq_lens: _Optional[_Union[Tensor, _Mapping]] = ..., input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., loss_mask: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., group_index: _Optional[_Union[Tensor, _Mapping]] = ..., advantages: _Optional[_Union[Tensor, _Mapping]] = ..., inference_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., ref_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., fetched_unix_s: _Optional[float] = ..., routed_experts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("env_id", "overrides_json", "has_advantages", "has_inference_logprobs", "has_ref_logprobs")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_JSON_FIELD_NUMBER: _ClassVar[int]
    HAS_ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    HAS_INFERENCE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    HAS_REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    env_id: int
    overrides_json: str
    has_advantages: bool
    has_inference_logprobs: bool
    has_ref_logprobs: bool
    def __init__(self, env_id: _Optional[int] = ..., overrides_json: _Optional[str] = ..., has_advantages: _Optional[bool] = ..., has_inference_logprobs: _Optional[bool] = ..., has_ref_logprobs: _Optional[bool] = ...) -> None: ...

class AckBatchRequest(_message.Message):
    __slots__ = ("request_id", "batch_id", "trained_step")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINED_STEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    batch_id: str
    trained_step: int
    def __init__(self, request_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., trained_step: _Optional[int] = ...) -> None: ...

class AckBatchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CommitCheckpointRequest(_message.Message):
    __slots__ = ("request_id", "step", "checkpoint_path")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    step: int
    checkpoint_path: str
    def __init__(self, request_id: _Optional[str] = ..., step: _Optional[int] = ..., checkpoint_path: _Optional[str] = ...) -> None: ...

class CommitCheckpointResponse(_message.Message):
    __slots__ = ("committed_batches", "retained_batches")
    COMMITTED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    RETAINED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    committed_batches: int
    retained_batches: int
    def __init__(self, committed_batches: _Optional[int] = ..., retained_batches: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class BridgeStatus(_message.Message):
    __slots__ = ("registered", "queue_depth", "unacked", "batches_fetched", "batches_served", "batches_acked", "rejected_groups", "next_step", "atropos_url", "atropos_reachable", "weight_version", "servers", "weight_pushes", "mode", "retained", "committed_step", "batches_committed", "batches_replayed", "spool_bytes", "servers_behind", "atropos", "stalls", "seconds_since_batch", "seconds_without_batch", "last_acked_batch_id", "last_acked_step", "routed_experts")
    class RejectedGroupsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    UNACKED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_SERVED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_ACKED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    ATROPOS_URL_FIELD_NUMBER: _ClassVar[int]
    ATROPOS_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_PUSHES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    BATCHES_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVERS_BEHIND_FIELD_NUMBER: _ClassVar[int]
    ATROPOS_FIELD_NUMBER: _ClassVar[int]
    STALLS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_BATCH_FIELD_NUMBER: _ClassVar[int]
    SECONDS_WITHOUT_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAST_ACKED_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ACKED_STEP_FIELD_NUMBER: _ClassVar[int]
    ROUTED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    registered: bool
    queue_depth: int
    unacked: int
    batches_fetched: int
    batches_served: int
    batches_acked: int
    rejected_groups: _containers.ScalarMap[str, int]
    next_step: int
    atropos_url: str
    atropos_reachable: bool
    weight_version: str
    servers: _containers.RepeatedCompositeFieldContainer[InferenceServerStatus]
    weight_pushes: int
    mode: str
    retained: int
    committed_step: int
    batches_committed: int
    batches_replayed: int
    spool_bytes: int
    servers_behind: int
    atropos: AtroposQueue
    stalls: _containers.RepeatedCompositeFieldContainer[Stall]
    seconds_since_batch: float
    seconds_without_batch: float
    last_acked_batch_id: str
    last_acked_step: int
    routed_experts: RoutedExpertsCapture
    def __init__(self, registered: _Optional[bool] = ..., queue_depth: _Optional[int] = ..., unacked: _Optional[int] = ..., batches_fetched: _Optional[int] = ..., batches_served: _Optional[int] = ..., batches_acked: _Optional[int] = ..., rejected_groups: _Optional[_Mapping[str, int]] = ..., next_step: _Optional[int] = ..., atropos_url: _Optional[str] = ..., atropos_reachable: _Optional[bool] = ..., weight_version: _Optional[str] = ..., servers: _Optional[_Iterable[_Union[InferenceServerStatus, _Mapping]]] = ..., weight_pushes: _Optional[int] = ..., mode: _Optional[str] = ..., retained: _Optional[int] = ..., committed_step: _Optional[int] = ..., batches_committed: _Optional[int] = ..., batches_replayed: _Optional[int] = ..., spool_bytes: _Optional[int] = ..., servers_behind: _Optional[int] = ..., atropos: _Optional[_Union[AtroposQueue, _Mapping]] = ..., stalls: _Optional[_Iterable[_Union[Stall, _Mapping]]] = ..., seconds_since_batch: _Optional[float] = ..., seconds_without_batch: _Optional[float] = ..., last_acked_batch_id: _Optional[str] = ..., last_acked_step: _Optional[int] = ..., routed_experts: _Optional[_Union[RoutedExpertsCapture, _Mapping]] = ...) -> None: ...

class RoutedExpertsCapture(_message.Message):
    __slots__ = ("enabled", "captured", "no_routing", "malformed", "evicted", "entries", "bytes", "sequences_matched", "sequences_unmatched", "width_mismatch", "shape_registered")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    NO_ROUTING_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_MATCHED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    SHAPE_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    captured: int
    no_routing: int
    malformed: int
    evicted: int
    entries: int
    bytes: int
    sequences_matched: int
    sequences_unmatched: int
    width_mismatch: int
    shape_registered: bool
    def __init__(self, enabled: _Optional[bool] = ..., captured: _Optional[int] = ..., no_routing: _Optional[int] = ..., malformed: _Optional[int] = ..., evicted: _Optional[int] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ..., sequences_matched: _Optional[int] = ..., sequences_unmatched: _Optional[int] = ..., width_mismatch: _Optional[int] = ..., shape_registered: _Optional[bool] = ...) -> None: ...

class Stall(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class AtroposQueue(_message.Message):
    __slots__ = ("observed", "reachable", "error", "age_s", "batches_formed", "queued_groups", "batch_size", "max_token_len", "largest_group", "min_allocation_claimed", "posting_rate", "seconds_since_posted", "envs")
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FORMED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKEN_LEN_FIELD_NUMBER: _ClassVar[int]
    LARGEST_GROUP_FIELD_NUMBER: _ClassVar[int]
    MIN_ALLOCATION_CLAIMED_FIELD_NUMBER: _ClassVar[int]
    POSTING_RATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_POSTED_FIELD_NUMBER: _ClassVar[int]
    ENVS_FIELD_NUMBER: _ClassVar[int]
    observed: bool
    reachable: bool
    error: str
    age_s: float
    batches_formed: int
    queued_groups: int
    batch_size: int
    max_token_len: int
    largest_group: int
    min_allocation_claimed: float
    posting_rate: float
    seconds_since_posted: float
    envs: _containers.RepeatedCompositeFieldContainer[AtroposEnv]
    def __init__(self, observed: _Optional[bool] = ..., reachable: _Optional[bool] = ..., error: _Optional[str] = ..., age_s: _Optional[float] = ..., batches_formed: _Optional[int] = ..., queued_groups: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_token_len: _Optional[int] = ..., largest_group: _Optional[int] = ..., min_allocation_claimed: _Optional[float] = ..., posting_rate: _Optional[float] = ..., seconds_since_posted: _Optional[float] = ..., envs: _Optional[_Iterable[_Union[AtroposEnv, _Mapping]]] = ...) -> None: ...

class AtroposEnv(_message.Message):
    __slots__ = ("env_id", "queued_groups", "seconds_quiet", "weight", "disconnected")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_QUIET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    env_id: int
    queued_groups: int
    seconds_quiet: float
    weight: float
    disconnected: bool
    def __init__(self, env_id: _Optional[int] = ..., queued_groups: _Optional[int] = ..., seconds_quiet: _Optional[float] = ..., weight: _Optional[float] = ..., disconnected: _Optional[bool] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("header", "bucket", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    bucket: WeightBucket
    data: bytes
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., bucket: _Optional[_Union[WeightBucket, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("request_id", "weight_version", "transport", "num_buckets", "total_bytes", "disk_path", "group", "lora")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    NUM_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_PATH_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    weight_version: str
    transport: WeightTransport
    num_buckets: int
    total_bytes: int
    disk_path: str
    group: DistributedGroup
    lora: LoraAdapter
    def __init__(self, request_id: _Optional[str] = ..., weight_version: _Optional[str] = ..., transport: _Optional[_Union[WeightTransport, str]] = ..., num_buckets: _Optional[int] = ..., total_bytes: _Optional[int] = ..., disk_path: _Optional[str] = ..., group: _Optional[_Union[DistributedGroup, _Mapping]] = ..., lora: _Optional[_Union[LoraAdapter, _Mapping]] = ...) -> None: ...

class LoraAdapter(_message.Message):
    __slots__ = ("name", "config_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class DistributedGroup(_message.Message):
    __slots__ = ("master_address", "master_port", "group_name", "backend", "world_size", "init")
    MASTER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    master_address: str
    master_port: int
    group_name: str
    backend: str
    world_size: int
    init: bool
    def __init__(self, master_address: _Optional[str] = ..., master_port: _Optional[int] = ..., group_name: _Optional[str] = ..., backend: _Optional[str] = ..., world_size: _Optional[int] = ..., init: _Optional[bool] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class WeightBucket(_message.Message):
    __slots__ = ("index", "tensors", "nbytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    nbytes: int
    def __init__(self, index: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PushWeightsResponse(_message.Message):
    __slots__ = ("weight_version", "buckets", "bytes", "seconds", "servers")
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    weight_version: str
    buckets: int
    bytes: int
    seconds: float
    servers: _containers.RepeatedCompositeFieldContainer[InferenceServerStatus]
    def __init__(self, weight_version: _Optional[str] = ..., buckets: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., servers: _Optional[_Iterable[_Union[InferenceServerStatus, _Mapping]]] = ...) -> None: ...

class InferenceServerStatus(_message.Message):
    __slots__ = ("url", "healthy", "weight_version", "sglang_version", "tp_size", "last_error", "updated", "cache_flushes_skipped")
    URL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SGLANG_VERSION_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    CACHE_FLUSHES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    url: str
    healthy: bool
    weight_version: str
    sglang_version: str
    tp_size: int
    last_error: str
    updated: bool
    cache_flushes_skipped: int
    def __init__(self, url: _Optional[str] = ..., healthy: _Optional[bool] = ..., weight_version: _Optional[str] = ..., sglang_version: _Optional[str] = ..., tp_size: _Optional[int] = ..., last_error: _Optional[str] = ..., updated: _Optional[bool] = ..., cache_flushes_skipped: _Optional[int] = ...) -> None: ...
