//! The Vulkan side: instance, device, memory, pipelines, recording and
//! settling batches.
//!
//! * **Loading.** `libvulkan` is opened at run time (ash's `loaded`
//!   feature): building needs nothing of Vulkan, and a machine without a
//!   loader or a device gets `Error::Unavailable` with the reason.
//! * **Memory.** Tensors are sub-allocated ([`crate::arena`]) from a few
//!   large device-local blocks, each one `VkDeviceMemory` with one storage
//!   `VkBuffer` over all of it; a tensor is (block, offset). Uploads,
//!   writes and downloads go through host-visible staging blocks (also
//!   sub-allocated) and are *recorded* copies, ordered with the kernels, so
//!   a range freed by a dropped tensor may be reused at once.
//! * **Batching.** Every op records into one command buffer; it is
//!   submitted (and waited for) only at `download`, `write` of a staging
//!   overflow, `synchronize`, or when the status entries run out. Between
//!   commands a global memory barrier orders everything.
//! * **Pipelines** are created once per (kernel, specialization constants)
//!   through a `VkPipelineCache`. Constant 0 is the device's subgroup size,
//!   constant 1 the workgroup size; kernel constants follow.
//! * **Deferred checks** ([`crate::checks`], decoded by `deepport-gpu-host`): check kernels flag the first
//!   bad element of an index tensor in a status buffer; the error is
//!   returned by the next `download`/`synchronize`, once.
//! * **Validation.** With `VulkanOptions::validation` (tests turn it on when
//!   `VK_LAYER_KHRONOS_validation` is installed) every validation error is
//!   collected by a debug-utils callback and returned as `Error::Device` at
//!   the next settle.

use crate::checks::{Check, CheckKind, ENTRY_WORDS, STATUS_ENTRIES};
use ash::vk;
use deepport_core::{Error, Result};
use deepport_gpu_host::arena::{Arena, NeedBlock, Slot};
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::{Arc, Mutex, MutexGuard};

/// Registered name of the backend.
pub(crate) const BACKEND: &str = "vulkan";
/// Size of a regular device block.
const DEVICE_BLOCK: u64 = 256 << 20;
/// Size of a regular staging block.
const HOST_BLOCK: u64 = 64 << 20;
/// Descriptor sets per descriptor pool.
const POOL_SETS: u32 = 1024;
/// Most storage buffers a kernel binds.
pub(crate) const MAX_BINDINGS: u32 = 8;
/// Bytes of push constants every pipeline layout declares.
pub(crate) const PUSH_BYTES: u32 = 128;
/// Default workgroup size (spec constant 1).
pub(crate) const WG: u32 = 256;

pub(crate) fn dev_err(msg: impl Into<String>) -> Error {
    Error::Device {
        backend: BACKEND.into(),
        msg: msg.into(),
    }
}

fn vk_err(what: &str, r: vk::Result) -> Error {
    dev_err(format!("{what}: {r:?}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A size or index as u32 (kernels index with 32 bits).
pub(crate) fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::not_supported(
            BACKEND,
            op,
            format!("{what} = {v} exceeds the 32-bit indexing of the kernels"),
        )
    })
}

/// How to create the backend.
#[derive(Clone, Debug, Default)]
pub struct VulkanOptions {
    /// Index into the physical devices that have a compute queue.
    pub device: usize,
    /// Enable `VK_LAYER_KHRONOS_validation` (fails creation when the layer
    /// is not installed) and report its errors as `Error::Device`.
    pub validation: bool,
    /// Use only the portable kernels (32-bit words, shared-memory
    /// reductions), whatever the device offers: the fallback path, tested
    /// on devices that have the rest (`DEEPPORT_VULKAN_PORTABLE=1`).
    pub portable: bool,
    /// Debugging: `alloc` fills new tensors with all-ones bytes (NaN in
    /// f32, bf16, f16 and e4m3; -1 in integers) instead of zeros, so a
    /// kernel that reads what nobody wrote shows up
    /// (`DEEPPORT_VULKAN_POISON=1`).
    pub poison: bool,
}

/// What the kernels of an instance use of the device, decided at creation
/// from [`Features`] (reported by `info()` and `deepport list`).
#[derive(Clone, Debug, Default)]
pub struct Used {
    /// `subgroupAdd`/`subgroupMax` in the workgroup reductions of
    /// `rms_norm`, `act_quant` and `mla_decode` (the `*_sg` kernels).
    pub subgroup_reductions: bool,
    /// FP8 GEMM operands read as `uint8_t` (8-bit storage) and decoded to
    /// f16 with int8 arithmetic (`gemm_rows_s8`).
    pub fp8_storage8: bool,
    /// The cooperative-matrix `fp8_gemm` tile (M, N, K), when used.
    pub coopmat: Option<[u32; 3]>,
    /// Why the cooperative-matrix path is used or not.
    pub coopmat_reason: String,
}

impl Used {
    /// Decides from what the device offers.
    pub fn decide(f: &Features, portable: bool) -> Used {
        if portable {
            return Used {
                coopmat_reason: "portable kernels requested".into(),
                ..Used::default()
            };
        }
        let (coopmat, coopmat_reason) = if !f.cooperative_matrix {
            (
                None,
                "the device lacks VK_KHR_cooperative_matrix".to_string(),
            )
        } else if !(f.shader_f16 && f.shader_i8 && f.storage8 && f.memory_model) {
            (
                None,
                "f16, int8, 8-bit storage or the Vulkan memory model is missing".to_string(),
            )
        } else {
            match pick_coopmat(&f.coopmat_configs, f.subgroup_size) {
                Some(c) => (
                    Some(c),
                    format!("{}x{}x{} f16·f16→f32, subgroup scope", c[0], c[1], c[2]),
                ),
                None => (
                    None,
                    "no subgroup-scope (M, N, K, f16, f16, f32) configuration with K dividing 128"
                        .to_string(),
                ),
            }
        };
        Used {
            subgroup_reductions: f.subgroup_arith && f.subgroup_compute && f.subgroup_size <= 128,
            fp8_storage8: f.storage8 && f.shader_i8 && f.shader_f16,
            coopmat,
            coopmat_reason,
        }
    }
}

/// A cooperative-matrix configuration `(M, N, K)` with f16 A/B and f32
/// C/result at subgroup scope (as the device lists them), K dividing 128
/// and tiles small enough for shared memory; the largest M·N wins.
pub fn pick_coopmat(configs: &[CoopmatConfig], subgroup: u32) -> Option<[u32; 3]> {
    configs
        .iter()
        .filter(|c| {
            c.f16_f16_f32
                && c.subgroup_scope
                && c.k > 0
                && 128 % c.k == 0
                && c.m > 0
                && c.n > 0
                && c.m * c.n <= 64 * 64
                && subgroup > 0
        })
        .max_by_key(|c| (c.m * c.n, c.k))
        .map(|c| [c.m, c.n, c.k])
}

/// One `VkCooperativeMatrixPropertiesKHR`, reduced to what matters here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoopmatConfig {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    /// A and B f16, C and result f32, no saturation.
    pub f16_f16_f32: bool,
    pub subgroup_scope: bool,
}

/// What the device offers, as queried (reported in `info()` and README).
#[derive(Clone, Debug, Default)]
pub struct Features {
    pub api: u32,
    pub subgroup_size: u32,
    pub subgroup_arith: bool,
    /// Subgroup operations are supported in compute shaders.
    pub subgroup_compute: bool,
    pub shader_f16: bool,
    pub shader_i8: bool,
    pub storage16: bool,
    pub storage8: bool,
    pub max_storage_range: u64,
    pub min_storage_align: u64,
    pub max_groups: [u32; 3],
    pub cooperative_matrix: bool,
    /// The device's cooperative-matrix configurations (empty without the
    /// extension).
    pub coopmat_configs: Vec<CoopmatConfig>,
    /// `vulkanMemoryModel` (what cooperative-matrix SPIR-V declares).
    pub memory_model: bool,
    pub timestamps: bool,
    /// Valid bits of the compute queue's timestamps.
    pub timestamp_bits: u32,
    /// Nanoseconds per timestamp tick.
    pub timestamp_period: f32,
}

/// The collector the validation callback writes into.
type Messages = Mutex<Vec<String>>;

/// Validation / debug messages of severity error.
unsafe extern "system" fn debug_callback(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    _types: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    user: *mut c_void,
) -> vk::Bool32 {
    if severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::ERROR)
        && !data.is_null()
        && !user.is_null()
    {
        // SAFETY: the loader passes a valid callback data struct for the
        // duration of the call; `user` is the `Messages` boxed in `Shared`,
        // which outlives the messenger (destroyed first in `Drop`).
        let (msg, sink) = unsafe {
            let d = &*data;
            let m = if d.p_message.is_null() {
                "(no message)".to_string()
            } else {
                CStr::from_ptr(d.p_message).to_string_lossy().into_owned()
            };
            (m, &*(user as *const Messages))
        };
        lock(sink).push(msg);
    }
    vk::FALSE
}

struct DeviceBlock {
    mem: vk::DeviceMemory,
    buf: vk::Buffer,
}

struct HostBlock {
    mem: vk::DeviceMemory,
    buf: vk::Buffer,
    /// Persistently mapped address (as an integer so the state is Send).
    ptr: usize,
}

/// A compiled pipeline and its layouts.
pub(crate) struct Pipe {
    pipeline: vk::Pipeline,
    layout: vk::PipelineLayout,
    set_layout: vk::DescriptorSetLayout,
    nbind: u32,
}

/// What is locked while an op records or a batch settles.
pub(crate) struct State {
    dev: Arena,
    dev_blocks: Vec<DeviceBlock>,
    host: Arena,
    host_blocks: Vec<HostBlock>,
    /// Staging slots to release when the batch has completed.
    staging: Vec<Slot>,
    /// Downloads of this batch: (staging slot, bytes) read after the wait.
    cmd: vk::CommandBuffer,
    recording: bool,
    commands: usize,
    pipelines: HashMap<(&'static str, Vec<u32>), Arc<Pipe>>,
    pools: Vec<vk::DescriptorPool>,
    pool_used: usize,
    checks: Vec<Check>,
    /// An error found while recording (reported at the next settle).
    deferred: Option<Error>,
    lost: Option<String>,
    /// Timestamp queries around each op, while `set_timing(true)`.
    timing: Option<Timing>,
}

/// Timestamps per batch (two per op; ops beyond them go untimed).
const TIMING_QUERIES: u32 = 4096;

/// Device timing: a timestamp query pool and the time measured so far.
pub(crate) struct Timing {
    pool: vk::QueryPool,
    /// Queries written in the current batch.
    used: u32,
    /// Nanoseconds measured since the last `take_device_seconds`.
    ns: f64,
}

/// Everything that tensors keep alive.
pub(crate) struct Shared {
    _entry: ash::Entry,
    instance: ash::Instance,
    debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    messages: Box<Messages>,
    pub(crate) device: ash::Device,
    queue: vk::Queue,
    cmd_pool: vk::CommandPool,
    fence: vk::Fence,
    cache: vk::PipelineCache,
    status: DeviceBlock,
    dev_type: u32,
    host_type: u32,
    pub(crate) features: Features,
    pub(crate) used: Used,
    pub(crate) name: String,
    pub(crate) driver: String,
    pub(crate) vendor: u32,
    pub(crate) validation: bool,
    pub(crate) poison: bool,
    /// Device slots of dropped tensors, returned to the arena under `state`.
    freed: Mutex<Vec<Slot>>,
    state: Mutex<State>,
    recorder: Mutex<Option<std::thread::ThreadId>>,
}

/// The vulkan context of one backend instance.
pub(crate) type Ctx = Arc<Shared>;

/// Device memory of a vulkan tensor: a range of a device block.
pub struct VulkanStorage {
    pub(crate) shared: Arc<Shared>,
    pub(crate) slot: Slot,
    /// Bytes of data.
    pub(crate) bytes: u64,
}

impl deepport_core::backend::Storage for VulkanStorage {
    fn backend(&self) -> &str {
        BACKEND
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Drop for VulkanStorage {
    fn drop(&mut self) {
        lock(&self.shared.freed).push(self.slot);
    }
}

/// A buffer range bound to a kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bind {
    pub(crate) buf: vk::Buffer,
    pub(crate) offset: u64,
    pub(crate) range: u64,
}

fn pick_type(
    props: &vk::PhysicalDeviceMemoryProperties,
    want: vk::MemoryPropertyFlags,
) -> Option<u32> {
    (0..props.memory_type_count)
        .find(|&i| props.memory_types[i as usize].property_flags.contains(want))
}

/// The physical devices with a compute queue: (handle, family, name).
fn compute_devices(instance: &ash::Instance) -> Result<Vec<(vk::PhysicalDevice, u32)>> {
    // SAFETY: `instance` is a live instance; the returned handles are only
    // used with it.
    let pds = unsafe { instance.enumerate_physical_devices() }
        .map_err(|e| vk_err("vkEnumeratePhysicalDevices", e))?;
    let mut out = Vec::new();
    for pd in pds {
        // SAFETY: `pd` was just enumerated from `instance`.
        let fams = unsafe { instance.get_physical_device_queue_family_properties(pd) };
        if let Some(f) = fams
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
        {
            out.push((pd, f as u32));
        }
    }
    Ok(out)
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND.into(),
        reason: reason.into(),
    }
}

fn load_entry() -> Result<ash::Entry> {
    // SAFETY: loading the system's Vulkan loader runs its initialisers; this
    // is the documented way to use ash's `loaded` feature.
    unsafe { ash::Entry::load() }.map_err(|e| unavailable(format!("no Vulkan loader: {e}")))
}

fn make_instance(entry: &ash::Entry, validation: bool) -> Result<ash::Instance> {
    let app = vk::ApplicationInfo::default()
        .application_name(c"deepport")
        .api_version(vk::API_VERSION_1_1);
    let layer = c"VK_LAYER_KHRONOS_validation";
    let layers = [layer.as_ptr()];
    let exts = [ash::ext::debug_utils::NAME.as_ptr()];
    let mut ci = vk::InstanceCreateInfo::default().application_info(&app);
    if validation {
        // SAFETY: plain enumeration on a loaded entry.
        let have = unsafe { entry.enumerate_instance_layer_properties() }
            .unwrap_or_default()
            .iter()
            .any(|l| l.layer_name_as_c_str().ok() == Some(layer));
        if !have {
            return Err(unavailable(
                "validation was requested but VK_LAYER_KHRONOS_validation is not installed",
            ));
        }
        ci = ci
            .enabled_layer_names(&layers)
            .enabled_extension_names(&exts);
    }
    // SAFETY: `ci` and everything it points to live until the call returns.
    unsafe { entry.create_instance(&ci, None) }
        .map_err(|e| unavailable(format!("vkCreateInstance failed: {e:?}")))
}

/// Whether the validation layer is installed here.
pub fn validation_available() -> bool {
    let Ok(entry) = load_entry() else {
        return false;
    };
    // SAFETY: plain enumeration on a loaded entry.
    unsafe { entry.enumerate_instance_layer_properties() }
        .unwrap_or_default()
        .iter()
        .any(|l| l.layer_name_as_c_str().ok() == Some(c"VK_LAYER_KHRONOS_validation"))
}

/// Names of the compute devices (for `devices()`): (name, driver, vendor).
pub(crate) fn list_devices() -> Result<Vec<(String, String, u32)>> {
    let entry = load_entry()?;
    let instance = make_instance(&entry, false)?;
    let r = compute_devices(&instance).map(|v| {
        v.iter()
            .map(|&(pd, _)| {
                // SAFETY: `pd` belongs to the live `instance`.
                let p = unsafe { instance.get_physical_device_properties(pd) };
                (
                    p.device_name_as_c_str()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    version_string(p.driver_version),
                    p.vendor_id,
                )
            })
            .collect()
    });
    // SAFETY: nothing made from the instance is alive any more.
    unsafe { instance.destroy_instance(None) };
    r
}

fn version_string(v: u32) -> String {
    format!(
        "{}.{}.{}",
        vk::api_version_major(v),
        vk::api_version_minor(v),
        vk::api_version_patch(v)
    )
}

impl Shared {
    /// Creates instance, device, queue and the fixed objects.
    pub(crate) fn new(opts: &VulkanOptions) -> Result<Arc<Self>> {
        let entry = load_entry()?;
        let instance = make_instance(&entry, opts.validation)?;
        let messages: Box<Messages> = Box::new(Mutex::new(Vec::new()));
        // From here on, failures must destroy the instance: build the rest
        // in a helper and clean up on error.
        match Self::build(&entry, &instance, opts, &messages) {
            Ok(parts) => Ok(Arc::new(Self::assemble(
                entry, instance, messages, opts, parts,
            ))),
            Err(e) => {
                // SAFETY: `build` destroyed whatever it created before failing.
                unsafe { instance.destroy_instance(None) };
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn build(
        entry: &ash::Entry,
        instance: &ash::Instance,
        opts: &VulkanOptions,
        messages: &Messages,
    ) -> Result<Parts> {
        let devs = compute_devices(instance)?;
        if devs.is_empty() {
            return Err(unavailable("no Vulkan device with a compute queue"));
        }
        let &(pd, family) = devs.get(opts.device).ok_or_else(|| {
            unavailable(format!(
                "vulkan:{} requested but only {} device(s) found",
                opts.device,
                devs.len()
            ))
        })?;
        // SAFETY: `pd` belongs to `instance`.
        let props = unsafe { instance.get_physical_device_properties(pd) };
        if props.api_version < vk::API_VERSION_1_1 {
            return Err(unavailable("the device supports Vulkan < 1.1"));
        }
        let mut sub = vk::PhysicalDeviceSubgroupProperties::default();
        let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut sub);
        // SAFETY: Vulkan 1.1 instance; `p2` chains a valid struct.
        unsafe { instance.get_physical_device_properties2(pd, &mut p2) };
        let mut f16i8 = vk::PhysicalDeviceShaderFloat16Int8Features::default();
        let mut s16 = vk::PhysicalDevice16BitStorageFeatures::default();
        let mut s8 = vk::PhysicalDevice8BitStorageFeatures::default();
        let mut mm = vk::PhysicalDeviceVulkanMemoryModelFeatures::default();
        let mut cm = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
        let mut f2 = vk::PhysicalDeviceFeatures2::default()
            .push_next(&mut f16i8)
            .push_next(&mut s16)
            .push_next(&mut s8);
        if props.api_version >= vk::API_VERSION_1_2 {
            f2 = f2.push_next(&mut mm);
        }
        // SAFETY: as above; unknown structs are ignored by the driver.
        unsafe { instance.get_physical_device_features2(pd, &mut f2) };
        // SAFETY: `pd` belongs to `instance`.
        let exts =
            unsafe { instance.enumerate_device_extension_properties(pd) }.unwrap_or_default();
        let has_ext = |n: &CStr| {
            exts.iter()
                .any(|e| e.extension_name_as_c_str().ok() == Some(n))
        };
        let has_coopmat = has_ext(c"VK_KHR_cooperative_matrix");
        let mut coopmat_configs = Vec::new();
        if has_coopmat {
            let mut cf2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut cm);
            // SAFETY: as above.
            unsafe { instance.get_physical_device_features2(pd, &mut cf2) };
            let cmi = ash::khr::cooperative_matrix::Instance::new(entry, instance);
            // SAFETY: the device lists the extension; `pd` belongs to `instance`.
            let props = unsafe { cmi.get_physical_device_cooperative_matrix_properties(pd) }
                .unwrap_or_default();
            coopmat_configs = props
                .iter()
                .map(|p| CoopmatConfig {
                    m: p.m_size,
                    n: p.n_size,
                    k: p.k_size,
                    f16_f16_f32: p.a_type == vk::ComponentTypeKHR::FLOAT16
                        && p.b_type == vk::ComponentTypeKHR::FLOAT16
                        && p.c_type == vk::ComponentTypeKHR::FLOAT32
                        && p.result_type == vk::ComponentTypeKHR::FLOAT32
                        && p.saturating_accumulation == vk::FALSE,
                    subgroup_scope: p.scope == vk::ScopeKHR::SUBGROUP,
                })
                .collect();
        }
        // SAFETY: `pd` belongs to `instance`.
        let fams = unsafe { instance.get_physical_device_queue_family_properties(pd) };
        let lim = props.limits;
        let features = Features {
            api: props.api_version,
            subgroup_size: sub.subgroup_size.max(1),
            subgroup_arith: sub
                .supported_operations
                .contains(vk::SubgroupFeatureFlags::ARITHMETIC | vk::SubgroupFeatureFlags::BASIC),
            subgroup_compute: sub.supported_stages.contains(vk::ShaderStageFlags::COMPUTE),
            shader_f16: f16i8.shader_float16 == vk::TRUE,
            shader_i8: f16i8.shader_int8 == vk::TRUE,
            storage16: s16.storage_buffer16_bit_access == vk::TRUE,
            storage8: s8.storage_buffer8_bit_access == vk::TRUE,
            max_storage_range: lim.max_storage_buffer_range as u64,
            min_storage_align: lim.min_storage_buffer_offset_alignment.max(4),
            max_groups: lim.max_compute_work_group_count,
            cooperative_matrix: has_coopmat && cm.cooperative_matrix == vk::TRUE,
            coopmat_configs,
            memory_model: mm.vulkan_memory_model == vk::TRUE,
            timestamp_period: lim.timestamp_period,
            timestamps: fams
                .get(family as usize)
                .is_some_and(|f| f.timestamp_valid_bits > 0),
            timestamp_bits: fams
                .get(family as usize)
                .map_or(0, |f| f.timestamp_valid_bits),
        };
        if lim.max_push_constants_size < PUSH_BYTES {
            return Err(unavailable("maxPushConstantsSize < 128"));
        }
        // SAFETY: `pd` belongs to `instance`.
        let mem = unsafe { instance.get_physical_device_memory_properties(pd) };
        let dev_type = pick_type(&mem, vk::MemoryPropertyFlags::DEVICE_LOCAL)
            .ok_or_else(|| unavailable("no device-local memory type"))?;
        let host_type = pick_type(
            &mem,
            vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT,
        )
        .ok_or_else(|| unavailable("no host-visible coherent memory type"))?;

        let debug = if opts.validation {
            let du = ash::ext::debug_utils::Instance::new(entry, instance);
            let info = vk::DebugUtilsMessengerCreateInfoEXT::default()
                .message_severity(
                    vk::DebugUtilsMessageSeverityFlagsEXT::ERROR
                        | vk::DebugUtilsMessageSeverityFlagsEXT::WARNING,
                )
                .message_type(
                    vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                        | vk::DebugUtilsMessageTypeFlagsEXT::GENERAL,
                )
                .pfn_user_callback(Some(debug_callback))
                .user_data(messages as *const Messages as *mut c_void);
            // SAFETY: `messages` is boxed by the caller and outlives the
            // messenger (destroyed in `Drop` before the box).
            let m = unsafe { du.create_debug_utils_messenger(&info, None) }
                .map_err(|e| unavailable(format!("debug messenger: {e:?}")))?;
            Some((du, m))
        } else {
            None
        };
        let prio = [1.0f32];
        let qci = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&prio)];
        // Enable what the kernels use (and nothing the device lacks).
        let used = Used::decide(&features, opts.portable);
        let mut en_f16i8 = vk::PhysicalDeviceShaderFloat16Int8Features::default()
            .shader_float16(used.fp8_storage8 || used.coopmat.is_some())
            .shader_int8(used.fp8_storage8 || used.coopmat.is_some());
        let mut en_s8 = vk::PhysicalDevice8BitStorageFeatures::default()
            .storage_buffer8_bit_access(used.fp8_storage8 || used.coopmat.is_some());
        let mut en_mm = vk::PhysicalDeviceVulkanMemoryModelFeatures::default()
            .vulkan_memory_model(used.coopmat.is_some());
        let mut en_cm =
            vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default().cooperative_matrix(true);
        // The extensions behind those features (core in Vulkan 1.2, but
        // the instance asks for 1.1): enabled where the device lists them.
        let mut wanted: Vec<&CStr> = Vec::new();
        if used.fp8_storage8 || used.coopmat.is_some() {
            wanted.extend([c"VK_KHR_8bit_storage", c"VK_KHR_shader_float16_int8"]);
        }
        if used.coopmat.is_some() {
            wanted.extend([c"VK_KHR_vulkan_memory_model", c"VK_KHR_cooperative_matrix"]);
        }
        let ext_names: Vec<*const std::ffi::c_char> = wanted
            .iter()
            .filter(|n| has_ext(n))
            .map(|n| n.as_ptr())
            .collect();
        let mut dci = vk::DeviceCreateInfo::default()
            .queue_create_infos(&qci)
            .enabled_extension_names(&ext_names)
            .push_next(&mut en_f16i8)
            .push_next(&mut en_s8);
        if used.coopmat.is_some() {
            dci = dci.push_next(&mut en_mm).push_next(&mut en_cm);
        }
        // SAFETY: `dci` and what it points to live until the call returns.
        let device = match unsafe { instance.create_device(pd, &dci, None) } {
            Ok(d) => d,
            Err(e) => {
                if let Some((du, m)) = &debug {
                    // SAFETY: created above, unused elsewhere.
                    unsafe { du.destroy_debug_utils_messenger(*m, None) };
                }
                return Err(unavailable(format!("vkCreateDevice: {e:?}")));
            }
        };
        Ok(Parts {
            debug,
            device,
            family,
            features,
            dev_type,
            host_type,
            name: props
                .device_name_as_c_str()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            driver: version_string(props.driver_version),
            vendor: props.vendor_id,
            used,
        })
    }

    fn assemble(
        entry: ash::Entry,
        instance: ash::Instance,
        messages: Box<Messages>,
        opts: &VulkanOptions,
        p: Parts,
    ) -> Self {
        let d = &p.device;
        // SAFETY (whole block): `d` is a live device; each create call gets
        // valid create infos; a failure leaves a null handle, which later
        // calls report (creation of these tiny objects only fails when the
        // device is out of memory).
        let (queue, cmd_pool, fence, cache, cmd) = unsafe {
            let queue = d.get_device_queue(p.family, 0);
            let cmd_pool = d
                .create_command_pool(
                    &vk::CommandPoolCreateInfo::default()
                        .queue_family_index(p.family)
                        .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                    None,
                )
                .unwrap_or_default();
            let fence = d
                .create_fence(&vk::FenceCreateInfo::default(), None)
                .unwrap_or_default();
            let cache = d
                .create_pipeline_cache(&vk::PipelineCacheCreateInfo::default(), None)
                .unwrap_or_default();
            let cmd = d
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(cmd_pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or_default();
            (queue, cmd_pool, fence, cache, cmd)
        };
        let status = make_block(d, p.dev_type, STATUS_ENTRIES as u64 * 16, false)
            .map(|(mem, buf, _)| DeviceBlock { mem, buf })
            .unwrap_or(DeviceBlock {
                mem: vk::DeviceMemory::null(),
                buf: vk::Buffer::null(),
            });
        let align = p.features.min_storage_align.max(256);
        let lost = if cmd == vk::CommandBuffer::null() || status.buf == vk::Buffer::null() {
            Some("creating the command buffer or status buffer failed".to_string())
        } else {
            None
        };
        Self {
            _entry: entry,
            instance,
            debug: p.debug,
            messages,
            device: p.device,
            queue,
            cmd_pool,
            fence,
            cache,
            status,
            dev_type: p.dev_type,
            host_type: p.host_type,
            features: p.features,
            used: p.used,
            name: p.name,
            driver: p.driver,
            vendor: p.vendor,
            validation: opts.validation,
            poison: opts.poison,
            freed: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                dev: Arena::new(DEVICE_BLOCK, align),
                dev_blocks: Vec::new(),
                host: Arena::new(HOST_BLOCK, 256),
                host_blocks: Vec::new(),
                staging: Vec::new(),
                cmd,
                recording: false,
                commands: 0,
                pipelines: HashMap::new(),
                pools: Vec::new(),
                pool_used: 0,
                checks: Vec::new(),
                deferred: None,
                lost,
                timing: None,
            }),
            recorder: Mutex::new(None),
        }
    }

    /// Locks the state, failing instead of deadlocking when this thread is
    /// recording an op.
    fn state(&self, what: &str) -> Result<MutexGuard<'_, State>> {
        if *lock(&self.recorder) == Some(std::thread::current().id()) {
            return Err(dev_err(format!(
                "{what} called while this thread records an op"
            )));
        }
        let st = lock(&self.state);
        if let Some(r) = &st.lost {
            return Err(dev_err(format!("{what}: device lost: {r}")));
        }
        Ok(st)
    }

    /// Bytes in device blocks (tests: few large allocations).
    pub(crate) fn device_blocks(&self) -> usize {
        lock(&self.state).dev_blocks.len()
    }

    /// A new device slot of `bytes` bytes.
    pub(crate) fn alloc(self: &Arc<Self>, what: &str, bytes: u64) -> Result<VulkanStorage> {
        let mut st = self.state(what)?;
        let slot = self.dev_slot(&mut st, what, bytes)?;
        Ok(VulkanStorage {
            shared: self.clone(),
            slot,
            bytes,
        })
    }

    fn dev_slot(&self, st: &mut State, what: &str, bytes: u64) -> Result<Slot> {
        for s in std::mem::take(&mut *lock(&self.freed)) {
            st.dev.free(s);
        }
        // Storage ranges are rounded to 4 bytes (kernels read words).
        let bytes = bytes.div_ceil(4).max(1) * 4;
        loop {
            match st.dev.alloc(bytes) {
                None => return Err(dev_err(format!("{what}: {bytes} bytes overflow"))),
                Some(Ok(s)) => return Ok(s),
                Some(Err(NeedBlock { size })) => {
                    let (mem, buf, _) = make_block(&self.device, self.dev_type, size, false)
                        .map_err(|e| dev_err(format!("{what}: allocating {size} bytes: {e}")))?;
                    st.dev_blocks.push(DeviceBlock { mem, buf });
                    st.dev.add_block(size);
                }
            }
        }
    }

    fn host_slot(&self, st: &mut State, what: &str, bytes: u64) -> Result<Slot> {
        loop {
            match st.host.alloc(bytes) {
                None => return Err(dev_err(format!("{what}: {bytes} bytes overflow"))),
                Some(Ok(s)) => return Ok(s),
                Some(Err(NeedBlock { size })) => {
                    let (mem, buf, ptr) = make_block(&self.device, self.host_type, size, true)
                        .map_err(|e| dev_err(format!("{what}: staging {size} bytes: {e}")))?;
                    st.host_blocks.push(HostBlock { mem, buf, ptr });
                    st.host.add_block(size);
                }
            }
        }
    }

    /// The bound range of a device slot.
    pub(crate) fn slot_buffer(&self, st: &State, slot: Slot) -> vk::Buffer {
        st.dev_blocks
            .get(slot.block)
            .map(|b| b.buf)
            .unwrap_or_default()
    }

    fn begin_cmd(&self, st: &mut State) -> Result<()> {
        if st.recording {
            return Ok(());
        }
        // SAFETY: `cmd` is not pending (every submit is waited for before
        // `recording` is cleared) and belongs to this device.
        unsafe {
            self.device
                .begin_command_buffer(
                    st.cmd,
                    &vk::CommandBufferBeginInfo::default()
                        .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                )
                .map_err(|e| vk_err("vkBeginCommandBuffer", e))?;
            // Fresh status entries for this batch.
            self.device
                .cmd_fill_buffer(st.cmd, self.status.buf, 0, vk::WHOLE_SIZE, 0);
            if let Some(t) = &mut st.timing {
                self.device
                    .cmd_reset_query_pool(st.cmd, t.pool, 0, TIMING_QUERIES);
                t.used = 0;
            }
        }
        st.recording = true;
        st.commands = 0;
        self.barrier(st);
        Ok(())
    }

    /// Orders everything recorded so far before everything after.
    fn barrier(&self, st: &State) {
        let all = vk::AccessFlags::SHADER_READ
            | vk::AccessFlags::SHADER_WRITE
            | vk::AccessFlags::TRANSFER_READ
            | vk::AccessFlags::TRANSFER_WRITE;
        let mb = [vk::MemoryBarrier::default()
            .src_access_mask(all)
            .dst_access_mask(all)];
        // SAFETY: `cmd` is recording (callers check `recording`).
        unsafe {
            self.device.cmd_pipeline_barrier(
                st.cmd,
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::DependencyFlags::empty(),
                &mb,
                &[],
                &[],
            )
        };
    }

    /// Zeroes a device slot after every op recorded so far. `alloc` does
    /// this: the trait allows uninitialised memory, but the other backends
    /// return zeros and callers that read rows a kernel skipped (masked
    /// GEMM rows) would otherwise see whatever a freed tensor left there.
    pub(crate) fn zero_slot(&self, what: &str, slot: Slot) -> Result<()> {
        self.fill_slot(what, slot, 0)
    }

    /// Fills a device slot with the 32-bit pattern `word`, ordered with the
    /// recorded work.
    pub(crate) fn fill_slot(&self, what: &str, slot: Slot, word: u32) -> Result<()> {
        let mut st = self.state(what)?;
        self.begin_cmd(&mut st)?;
        let buf = self.slot_buffer(&st, slot);
        // SAFETY: the slot lies inside its block's buffer and its size is a
        // multiple of 4 (the arena aligns sizes); `cmd` is recording.
        unsafe {
            self.device
                .cmd_fill_buffer(st.cmd, buf, slot.offset, slot.size, word)
        };
        self.barrier(&st);
        Ok(())
    }

    /// Writes `data` into `dst` (byte offset `off` of a device slot) after
    /// every op recorded so far.
    pub(crate) fn write_bytes(&self, what: &str, slot: Slot, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.state(what)?;
        self.begin_cmd(&mut st)?;
        let n = data.len() as u64;
        let hs = self.host_slot(&mut st, what, n)?;
        let hb = &st.host_blocks[hs.block];
        // SAFETY: the staging range [offset, offset + n) lies inside the
        // mapped block and no pending command uses it (staging slots are
        // released only after their batch completed).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (hb.ptr as *mut u8).add(hs.offset as usize),
                data.len(),
            )
        };
        let src = hb.buf;
        let dst = self.slot_buffer(&st, slot);
        // SAFETY: both ranges lie inside their buffers; `cmd` is recording.
        unsafe {
            self.device.cmd_copy_buffer(
                st.cmd,
                src,
                dst,
                &[vk::BufferCopy {
                    src_offset: hs.offset,
                    dst_offset: slot.offset,
                    size: n,
                }],
            )
        };
        st.staging.push(hs);
        self.barrier(&st);
        Ok(())
    }

    /// Copies `n` bytes at `off` of a device slot to the host after all
    /// recorded work, then reports failed checks and validation errors.
    pub(crate) fn read_bytes(&self, what: &str, slot: Slot, off: u64, n: u64) -> Result<Vec<u8>> {
        let mut st = self.state(what)?;
        self.begin_cmd(&mut st)?;
        let hs = self.host_slot(&mut st, what, n.max(1))?;
        let src = self.slot_buffer(&st, slot);
        let dst = st.host_blocks[hs.block].buf;
        if n > 0 {
            // SAFETY: ranges inside their buffers; `cmd` is recording.
            unsafe {
                self.device.cmd_copy_buffer(
                    st.cmd,
                    src,
                    dst,
                    &[vk::BufferCopy {
                        src_offset: slot.offset + off,
                        dst_offset: hs.offset,
                        size: n,
                    }],
                )
            };
        }
        st.staging.push(hs);
        let settled = self.settle(&mut st, what);
        // The staging slot is free again (settle released it) but nothing
        // has been recorded since: its bytes are intact.
        settled?;
        let hb = &st.host_blocks[hs.block];
        let mut out = vec![0u8; n as usize];
        // SAFETY: the batch has completed; the range lies in the mapped block.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (hb.ptr as *const u8).add(hs.offset as usize),
                out.as_mut_ptr(),
                n as usize,
            )
        };
        Ok(out)
    }

    /// Waits for all recorded work; reports failed checks and device errors.
    pub(crate) fn synchronize(&self) -> Result<()> {
        let mut st = self.state("synchronize")?;
        self.settle(&mut st, "synchronize")
    }

    /// Submits the batch, waits, reads the status, releases staging and
    /// descriptor sets, and returns the first error (once).
    fn settle(&self, st: &mut State, what: &str) -> Result<()> {
        let mut first: Option<Error> = st.deferred.take();
        if st.recording {
            let checks = std::mem::take(&mut st.checks);
            // Read the status entries back with the batch.
            let status_bytes = (checks.len() as u64) * 16;
            let hs = if status_bytes > 0 {
                let hs = self.host_slot(st, what, status_bytes)?;
                let dst = st.host_blocks[hs.block].buf;
                self.barrier(st);
                // SAFETY: ranges inside their buffers; `cmd` is recording.
                unsafe {
                    self.device.cmd_copy_buffer(
                        st.cmd,
                        self.status.buf,
                        dst,
                        &[vk::BufferCopy {
                            src_offset: 0,
                            dst_offset: hs.offset,
                            size: status_bytes,
                        }],
                    )
                };
                st.staging.push(hs);
                Some(hs)
            } else {
                None
            };
            st.recording = false;
            let cmds = [st.cmd];
            let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
            // SAFETY: `cmd` is fully recorded; the fence is unsignaled (it is
            // reset after every wait); the queue is used only under `state`.
            let r = unsafe {
                self.device
                    .end_command_buffer(st.cmd)
                    .and_then(|_| self.device.queue_submit(self.queue, &submit, self.fence))
                    .and_then(|_| self.device.wait_for_fences(&[self.fence], true, u64::MAX))
                    .and_then(|_| self.device.reset_fences(&[self.fence]))
            };
            if let Err(e) = r {
                let msg = format!("{what}: submitting the batch: {e:?}");
                if e == vk::Result::ERROR_DEVICE_LOST {
                    st.lost = Some(msg.clone());
                }
                return Err(dev_err(msg));
            }
            // SAFETY: the buffer's work has completed (fence waited).
            unsafe {
                let _ = self
                    .device
                    .reset_command_buffer(st.cmd, vk::CommandBufferResetFlags::empty());
            }
            self.read_timing(st);
            if let Some(hs) = hs {
                let hb = &st.host_blocks[hs.block];
                let mut words = vec![0u32; checks.len() * 4];
                // SAFETY: the batch completed; the range lies in the mapped
                // block and holds `status_bytes` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (hb.ptr as *const u8).add(hs.offset as usize),
                        words.as_mut_ptr() as *mut u8,
                        status_bytes as usize,
                    )
                };
                for c in &checks {
                    if let Some(e) = c.error(&words) {
                        if first.is_none() {
                            first = Some(e);
                        }
                    }
                }
            }
        }
        for s in std::mem::take(&mut st.staging) {
            st.host.free(s);
        }
        for p in &st.pools {
            // SAFETY: no command using the pool's sets is pending.
            unsafe {
                let _ = self
                    .device
                    .reset_descriptor_pool(*p, vk::DescriptorPoolResetFlags::empty());
            }
        }
        st.pool_used = 0;
        let msgs = std::mem::take(&mut *lock(&self.messages));
        if !msgs.is_empty() && first.is_none() {
            first = Some(dev_err(format!(
                "{what}: Vulkan validation reported {} error(s): {}",
                msgs.len(),
                msgs.join(" | ")
            )));
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Adds the completed batch's op times (pairs of timestamps) to the
    /// timing total.
    fn read_timing(&self, st: &mut State) {
        let Some(t) = &mut st.timing else { return };
        let n = std::mem::take(&mut t.used) & !1;
        if n == 0 {
            return;
        }
        let mut ticks = vec![0u64; n as usize];
        // SAFETY: queries [0, n) were reset and written in the batch that
        // has completed; `ticks` holds n 64-bit results.
        let r = unsafe {
            self.device.get_query_pool_results(
                t.pool,
                0,
                &mut ticks,
                vk::QueryResultFlags::TYPE_64 | vk::QueryResultFlags::WAIT,
            )
        };
        if r.is_err() {
            return;
        }
        let bits = self.features.timestamp_bits.min(64);
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let period = self.features.timestamp_period as f64;
        for pair in ticks.chunks_exact(2) {
            let d = pair[1].wrapping_sub(pair[0]) & mask;
            t.ns += d as f64 * period;
        }
    }

    /// Turns device timing on or off; false when the device has no
    /// timestamps on its compute queue. Settles the current batch first
    /// (an error it finds is kept for the next settle).
    pub(crate) fn set_timing(&self, on: bool) -> bool {
        if on && !self.features.timestamps {
            return false;
        }
        let Ok(mut st) = self.state("set_device_timing") else {
            return false;
        };
        if let Err(e) = self.settle(&mut st, "set_device_timing") {
            st.deferred.get_or_insert(e);
        }
        match (on, st.timing.take()) {
            (true, Some(t)) => {
                st.timing = Some(t);
                true
            }
            (true, None) => {
                let ci = vk::QueryPoolCreateInfo::default()
                    .query_type(vk::QueryType::TIMESTAMP)
                    .query_count(TIMING_QUERIES);
                // SAFETY: a valid create info on a live device.
                match unsafe { self.device.create_query_pool(&ci, None) } {
                    Ok(pool) => {
                        st.timing = Some(Timing {
                            pool,
                            used: 0,
                            ns: 0.0,
                        });
                        true
                    }
                    Err(_) => false,
                }
            }
            (false, Some(t)) => {
                // SAFETY: settled above: no pending command uses the pool.
                unsafe { self.device.destroy_query_pool(t.pool, None) };
                false
            }
            (false, None) => false,
        }
    }

    /// Seconds of device time measured since the last call (op by op,
    /// timestamp to timestamp); `None` while timing is off.
    pub(crate) fn take_device_seconds(&self) -> Option<f64> {
        let mut st = self.state("take_device_seconds").ok()?;
        let t = st.timing.as_mut()?;
        Some(std::mem::take(&mut t.ns) * 1e-9)
    }

    /// The variant of kernel `name` this instance runs: the subgroup
    /// reductions (`*_sg`) where [`Used::subgroup_reductions`].
    pub(crate) fn kernel(&self, name: &'static str) -> &'static str {
        if !self.used.subgroup_reductions {
            return name;
        }
        match name {
            "rms_stats" => "rms_stats_sg",
            "act_quant" => "act_quant_sg",
            "mla_decode" => "mla_decode_sg",
            other => other,
        }
    }

    /// Starts recording op `op`.
    pub(crate) fn begin(&self, op: &'static str) -> Result<Rec<'_>> {
        let mut st = self.state(op)?;
        self.begin_cmd(&mut st)?;
        *lock(&self.recorder) = Some(std::thread::current().id());
        let mut rec = Rec {
            ctx: self,
            op,
            st,
            scratch: Vec::new(),
            timed: None,
        };
        rec.stamp_start();
        Ok(rec)
    }

    /// A pipeline for kernel `name` with kernel constants `spec` (after the
    /// subgroup and workgroup sizes) and `nbind` storage bindings.
    fn pipeline(
        &self,
        st: &mut State,
        name: &'static str,
        wg: u32,
        spec: &[u32],
        nbind: u32,
    ) -> Result<Arc<Pipe>> {
        let mut key_spec = vec![wg, nbind];
        key_spec.extend_from_slice(spec);
        if let Some(p) = st.pipelines.get(&(name, key_spec.clone())) {
            return Ok(p.clone());
        }
        let code = crate::spirv(name).ok_or_else(|| dev_err(format!("no SPIR-V for {name}")))?;
        let words = ash::util::read_spv(&mut std::io::Cursor::new(code))
            .map_err(|e| dev_err(format!("{name}: bad SPIR-V: {e}")))?;
        let binds: Vec<_> = (0..nbind)
            .map(|i| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(i)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        let mut consts = vec![self.features.subgroup_size, wg];
        consts.extend_from_slice(spec);
        let entries: Vec<_> = (0..consts.len() as u32)
            .map(|i| {
                vk::SpecializationMapEntry::default()
                    .constant_id(i)
                    .offset(4 * i)
                    .size(4)
            })
            .collect();
        let data: Vec<u8> = consts.iter().flat_map(|c| c.to_le_bytes()).collect();
        let si = vk::SpecializationInfo::default()
            .map_entries(&entries)
            .data(&data);
        let d = &self.device;
        // SAFETY (whole block): every create info lives until its call
        // returns; on failure the objects created so far are destroyed.
        unsafe {
            let module = d
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)
                .map_err(|e| vk_err(name, e))?;
            let set_layout = match d.create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&binds),
                None,
            ) {
                Ok(l) => l,
                Err(e) => {
                    d.destroy_shader_module(module, None);
                    return Err(vk_err(name, e));
                }
            };
            let sls = [set_layout];
            let pcr = [vk::PushConstantRange::default()
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
                .offset(0)
                .size(PUSH_BYTES)];
            let layout = match d.create_pipeline_layout(
                &vk::PipelineLayoutCreateInfo::default()
                    .set_layouts(&sls)
                    .push_constant_ranges(&pcr),
                None,
            ) {
                Ok(l) => l,
                Err(e) => {
                    d.destroy_descriptor_set_layout(set_layout, None);
                    d.destroy_shader_module(module, None);
                    return Err(vk_err(name, e));
                }
            };
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(c"main")
                .specialization_info(&si);
            let ci = [vk::ComputePipelineCreateInfo::default()
                .stage(stage)
                .layout(layout)];
            let r = d.create_compute_pipelines(self.cache, &ci, None);
            d.destroy_shader_module(module, None);
            let pipeline = match r {
                Ok(v) => v.first().copied().unwrap_or_default(),
                Err((_, e)) => {
                    d.destroy_pipeline_layout(layout, None);
                    d.destroy_descriptor_set_layout(set_layout, None);
                    return Err(vk_err(&format!("{name}: creating the pipeline"), e));
                }
            };
            let p = Arc::new(Pipe {
                pipeline,
                layout,
                set_layout,
                nbind,
            });
            st.pipelines.insert((name, key_spec), p.clone());
            Ok(p)
        }
    }

    /// A descriptor set of `layout` from the batch's pools.
    fn descriptor_set(
        &self,
        st: &mut State,
        layout: vk::DescriptorSetLayout,
    ) -> Result<vk::DescriptorSet> {
        let ls = [layout];
        loop {
            if st.pool_used < st.pools.len() {
                let pool = st.pools[st.pool_used];
                // SAFETY: pool and layout belong to this device.
                match unsafe {
                    self.device.allocate_descriptor_sets(
                        &vk::DescriptorSetAllocateInfo::default()
                            .descriptor_pool(pool)
                            .set_layouts(&ls),
                    )
                } {
                    Ok(v) => return v.first().copied().ok_or_else(|| dev_err("no set")),
                    Err(vk::Result::ERROR_OUT_OF_POOL_MEMORY)
                    | Err(vk::Result::ERROR_FRAGMENTED_POOL) => st.pool_used += 1,
                    Err(e) => return Err(vk_err("vkAllocateDescriptorSets", e)),
                }
            } else {
                let sizes = [vk::DescriptorPoolSize {
                    ty: vk::DescriptorType::STORAGE_BUFFER,
                    descriptor_count: POOL_SETS * MAX_BINDINGS,
                }];
                // SAFETY: valid create info.
                let pool = unsafe {
                    self.device.create_descriptor_pool(
                        &vk::DescriptorPoolCreateInfo::default()
                            .max_sets(POOL_SETS)
                            .pool_sizes(&sizes),
                        None,
                    )
                }
                .map_err(|e| vk_err("vkCreateDescriptorPool", e))?;
                st.pools.push(pool);
            }
        }
    }
}

/// Inputs of [`Shared::build`].
struct Parts {
    debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    device: ash::Device,
    family: u32,
    features: Features,
    dev_type: u32,
    host_type: u32,
    name: String,
    driver: String,
    vendor: u32,
    used: Used,
}

/// A `VkDeviceMemory` of `size` bytes with one buffer over all of it
/// (mapped when `map`).
fn make_block(
    d: &ash::Device,
    ty: u32,
    size: u64,
    map: bool,
) -> std::result::Result<(vk::DeviceMemory, vk::Buffer, usize), String> {
    let usage = vk::BufferUsageFlags::STORAGE_BUFFER
        | vk::BufferUsageFlags::TRANSFER_SRC
        | vk::BufferUsageFlags::TRANSFER_DST;
    // SAFETY (whole block): valid create infos; on failure everything made
    // here is destroyed before returning.
    unsafe {
        let buf = d
            .create_buffer(
                &vk::BufferCreateInfo::default()
                    .size(size)
                    .usage(usage)
                    .sharing_mode(vk::SharingMode::EXCLUSIVE),
                None,
            )
            .map_err(|e| format!("vkCreateBuffer: {e:?}"))?;
        let req = d.get_buffer_memory_requirements(buf);
        if req.memory_type_bits & (1 << ty) == 0 {
            d.destroy_buffer(buf, None);
            return Err("the buffer cannot live in the chosen memory type".into());
        }
        let mem = match d.allocate_memory(
            &vk::MemoryAllocateInfo::default()
                .allocation_size(req.size)
                .memory_type_index(ty),
            None,
        ) {
            Ok(m) => m,
            Err(e) => {
                d.destroy_buffer(buf, None);
                return Err(format!("vkAllocateMemory: {e:?}"));
            }
        };
        if let Err(e) = d.bind_buffer_memory(buf, mem, 0) {
            d.destroy_buffer(buf, None);
            d.free_memory(mem, None);
            return Err(format!("vkBindBufferMemory: {e:?}"));
        }
        let mut ptr = 0usize;
        if map {
            match d.map_memory(mem, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) {
                Ok(p) => ptr = p as usize,
                Err(e) => {
                    d.destroy_buffer(buf, None);
                    d.free_memory(mem, None);
                    return Err(format!("vkMapMemory: {e:?}"));
                }
            }
        }
        Ok((mem, buf, ptr))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let d = &self.device;
        // SAFETY: this is the last reference: no tensor and no recording
        // remain. Waiting for idle first makes every destroy legal.
        unsafe {
            let _ = d.device_wait_idle();
            for p in st.pipelines.values() {
                d.destroy_pipeline(p.pipeline, None);
                d.destroy_pipeline_layout(p.layout, None);
                d.destroy_descriptor_set_layout(p.set_layout, None);
            }
            for p in &st.pools {
                d.destroy_descriptor_pool(*p, None);
            }
            for b in &st.dev_blocks {
                d.destroy_buffer(b.buf, None);
                d.free_memory(b.mem, None);
            }
            for b in &st.host_blocks {
                d.destroy_buffer(b.buf, None);
                d.free_memory(b.mem, None);
            }
            if let Some(t) = &st.timing {
                d.destroy_query_pool(t.pool, None);
            }
            d.destroy_buffer(self.status.buf, None);
            d.free_memory(self.status.mem, None);
            d.destroy_pipeline_cache(self.cache, None);
            d.destroy_fence(self.fence, None);
            d.destroy_command_pool(self.cmd_pool, None);
            d.destroy_device(None);
            if let Some((du, m)) = &self.debug {
                du.destroy_debug_utils_messenger(*m, None);
            }
            self.instance.destroy_instance(None);
        }
    }
}

/// An op being recorded: holds the state lock (and the batch).
pub(crate) struct Rec<'a> {
    pub(crate) ctx: &'a Shared,
    pub(crate) op: &'static str,
    st: MutexGuard<'a, State>,
    /// Scratch slots of this op, free for reuse once it is recorded (later
    /// commands are ordered after it by barriers).
    scratch: Vec<Slot>,
    /// The query pool and end query of this op's timestamp pair, while
    /// timing is on.
    timed: Option<(vk::QueryPool, u32)>,
}

impl Rec<'_> {
    /// Writes the start timestamp of this op (when timing is on and the
    /// batch has queries left).
    fn stamp_start(&mut self) {
        let cmd = self.st.cmd;
        if let Some(t) = &mut self.st.timing {
            if t.used + 2 <= TIMING_QUERIES {
                // SAFETY: `cmd` is recording; the query was reset at the
                // start of this batch and is written once.
                unsafe {
                    self.ctx.device.cmd_write_timestamp(
                        cmd,
                        vk::PipelineStageFlags::TOP_OF_PIPE,
                        t.pool,
                        t.used,
                    )
                };
                self.timed = Some((t.pool, t.used + 1));
                t.used += 2;
            }
        }
    }

    /// Writes the end timestamp of the pair `stamp_start` began, so that
    /// every started pair is complete before the batch is submitted.
    fn stamp_end(&mut self) {
        if let Some((pool, q)) = self.timed.take() {
            // SAFETY: `cmd` is still recording (only a settle ends it, and
            // that needs the state this op holds, see `entry`); query `q`
            // was reset in this batch and is written once.
            unsafe {
                self.ctx.device.cmd_write_timestamp(
                    self.st.cmd,
                    vk::PipelineStageFlags::BOTTOM_OF_PIPE,
                    pool,
                    q,
                )
            };
        }
    }
}

impl Drop for Rec<'_> {
    fn drop(&mut self) {
        // Also when the op failed: every started pair is completed.
        self.stamp_end();
        for s in self.scratch.drain(..) {
            self.st.dev.free(s);
        }
        *lock(&self.ctx.recorder) = None;
    }
}

/// Push constants of a dispatch: 32-bit words.
#[derive(Clone, Debug, Default)]
pub(crate) struct Push(Vec<u32>);

impl Push {
    pub(crate) fn new() -> Self {
        Self::default()
    }
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.push(v);
        self
    }
    pub(crate) fn f32(self, v: f32) -> Self {
        self.u32(v.to_bits())
    }
}

impl Rec<'_> {
    /// The binding of tensor `t` (whole data, or the view's range from the
    /// aligned offset at or below it) and the bytes from that offset to the
    /// data.
    pub(crate) fn bind(&self, t: &deepport_core::backend::Tensor) -> Result<(Bind, u64)> {
        let s = t
            .storage_any::<VulkanStorage>()
            .ok_or_else(|| Error::ForeignTensor {
                owner: t.owner().to_string(),
                backend: BACKEND.into(),
            })?;
        let align = self.ctx.features.min_storage_align;
        let off = s.slot.offset + t.offset_bytes() as u64;
        let base = off / align * align;
        let sub = off - base;
        let range = (sub + t.nbytes() as u64).div_ceil(4).max(1) * 4;
        if range > self.ctx.features.max_storage_range {
            return Err(Error::not_supported(
                BACKEND,
                self.op,
                format!(
                    "a {}-byte operand exceeds maxStorageBufferRange ({} bytes); windowing is not implemented",
                    range, self.ctx.features.max_storage_range
                ),
            ));
        }
        // A view's range may not run past the slot's end (rounded to 4).
        let end = (s.slot.offset + s.slot.size).max(base + range);
        let range = range.min(end - base);
        Ok((
            Bind {
                buf: self.ctx.slot_buffer(&self.st, s.slot),
                offset: base,
                range,
            },
            sub,
        ))
    }

    /// The binding of bytes `[off, off + len)` of `t`'s data (a window of a
    /// tensor beyond `maxStorageBufferRange`); `NotSupported` when the
    /// window does not start at an aligned offset or is itself too large.
    pub(crate) fn bind_bytes(
        &self,
        t: &deepport_core::backend::Tensor,
        off: u64,
        len: u64,
    ) -> Result<Bind> {
        let s = t
            .storage_any::<VulkanStorage>()
            .ok_or_else(|| Error::ForeignTensor {
                owner: t.owner().to_string(),
                backend: BACKEND.into(),
            })?;
        let start = s.slot.offset + t.offset_bytes() as u64 + off;
        let range = len.div_ceil(4).max(1) * 4;
        if !start.is_multiple_of(self.ctx.features.min_storage_align)
            || range > self.ctx.features.max_storage_range
            || off + len > t.nbytes() as u64
        {
            return Err(Error::not_supported(
                BACKEND,
                self.op,
                format!(
                    "a window of {len} bytes at byte {off} of an operand cannot be bound (alignment {}, maxStorageBufferRange {})",
                    self.ctx.features.min_storage_align, self.ctx.features.max_storage_range
                ),
            ));
        }
        Ok(Bind {
            buf: self.ctx.slot_buffer(&self.st, s.slot),
            offset: start,
            range,
        })
    }

    /// The largest range one binding may have (`maxStorageBufferRange`).
    pub(crate) fn max_range(&self) -> u64 {
        self.ctx.features.max_storage_range
    }

    /// The binding of a tensor that kernels read from its first byte
    /// (a view at a nonzero offset inside an aligned unit is NotSupported).
    pub(crate) fn whole(&self, t: &deepport_core::backend::Tensor) -> Result<Bind> {
        let (b, sub) = self.bind(t)?;
        if sub != 0 {
            return Err(Error::not_supported(
                BACKEND,
                self.op,
                "a view at an unaligned offset is read in place only by gather_rows and reduce_rows",
            ));
        }
        Ok(b)
    }

    /// The status buffer (checks bind it).
    pub(crate) fn status(&self) -> Bind {
        Bind {
            buf: self.ctx.status.buf,
            offset: 0,
            range: STATUS_ENTRIES as u64 * 16,
        }
    }

    /// Records a dispatch of `n` workgroups (split over x and y beyond the
    /// device limit; kernels compute the linear index with `wg_lin()`).
    pub(crate) fn dispatch(
        &mut self,
        name: &'static str,
        spec: &[u32],
        binds: &[Bind],
        push: &Push,
        n: u32,
    ) -> Result<()> {
        self.dispatch_wg(name, WG, spec, binds, push, n)
    }

    /// [`Rec::dispatch`] with workgroup size `wg` (spec constant 1).
    pub(crate) fn dispatch_wg(
        &mut self,
        name: &'static str,
        wg: u32,
        spec: &[u32],
        binds: &[Bind],
        push: &Push,
        n: u32,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if binds.len() as u32 > MAX_BINDINGS || push.0.len() * 4 > PUSH_BYTES as usize {
            return Err(dev_err(format!(
                "{name}: too many bindings or push constants"
            )));
        }
        let ctx = self.ctx;
        let st = &mut *self.st;
        let pipe = ctx.pipeline(st, name, wg, spec, binds.len() as u32)?;
        let set = ctx.descriptor_set(st, pipe.set_layout)?;
        let infos: Vec<[vk::DescriptorBufferInfo; 1]> = binds
            .iter()
            .map(|b| {
                [vk::DescriptorBufferInfo {
                    buffer: b.buf,
                    offset: b.offset,
                    range: b.range,
                }]
            })
            .collect();
        let writes: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(i as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        let gx = n.min(ctx.features.max_groups[0].max(1));
        let gy = n.div_ceil(gx);
        if gy > ctx.features.max_groups[1] {
            return Err(Error::not_supported(
                BACKEND,
                self.op,
                format!("{n} workgroups exceed the device's dispatch limits"),
            ));
        }
        let mut bytes: Vec<u8> = push.0.iter().flat_map(|w| w.to_le_bytes()).collect();
        if bytes.is_empty() {
            bytes.extend_from_slice(&[0; 4]);
        }
        debug_assert_eq!(pipe.nbind, binds.len() as u32);
        // SAFETY: the set, pipeline and layout were made for this device;
        // every binding is a live buffer range; `cmd` is recording.
        unsafe {
            ctx.device.update_descriptor_sets(&writes, &[]);
            ctx.device
                .cmd_bind_pipeline(st.cmd, vk::PipelineBindPoint::COMPUTE, pipe.pipeline);
            ctx.device.cmd_bind_descriptor_sets(
                st.cmd,
                vk::PipelineBindPoint::COMPUTE,
                pipe.layout,
                0,
                &[set],
                &[],
            );
            ctx.device.cmd_push_constants(
                st.cmd,
                pipe.layout,
                vk::ShaderStageFlags::COMPUTE,
                0,
                &bytes,
            );
            ctx.device.cmd_dispatch(st.cmd, gx, gy, 1);
        }
        st.commands += 1;
        ctx.barrier(st);
        Ok(())
    }

    /// What this instance's kernels use of the device.
    pub(crate) fn used(&self) -> &Used {
        &self.ctx.used
    }

    /// The device's subgroup size.
    pub(crate) fn subgroup_size(&self) -> u32 {
        self.ctx.features.subgroup_size
    }

    /// A device scratch range of `bytes` bytes, released when the op ends.
    pub(crate) fn scratch(&mut self, bytes: u64) -> Result<Bind> {
        let ctx = self.ctx;
        let slot = ctx.dev_slot(&mut self.st, self.op, bytes)?;
        self.scratch.push(slot);
        Ok(Bind {
            buf: ctx.slot_buffer(&self.st, slot),
            offset: slot.offset,
            range: slot.size,
        })
    }

    /// A scratch range holding `data` (a small table the host computed).
    pub(crate) fn table(&mut self, data: &[u8]) -> Result<Bind> {
        let b = self.scratch(data.len() as u64)?;
        let ctx = self.ctx;
        let st = &mut *self.st;
        let n = data.len() as u64;
        if n == 0 {
            return Ok(b);
        }
        let hs = ctx.host_slot(st, self.op, n)?;
        let hb = &st.host_blocks[hs.block];
        // SAFETY: the staging range lies inside the mapped block and no
        // pending command uses it (released only after its batch).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (hb.ptr as *mut u8).add(hs.offset as usize),
                data.len(),
            )
        };
        // SAFETY: both ranges lie inside live buffers; `cmd` is recording.
        unsafe {
            ctx.device.cmd_copy_buffer(
                st.cmd,
                hb.buf,
                b.buf,
                &[vk::BufferCopy {
                    src_offset: hs.offset,
                    dst_offset: b.offset,
                    size: n,
                }],
            )
        };
        st.staging.push(hs);
        ctx.barrier(st);
        Ok(b)
    }

    /// Zeroes a bound range (after everything recorded before).
    pub(crate) fn zero(&mut self, b: Bind) {
        let st = &*self.st;
        // SAFETY: the range lies inside a live buffer and is a multiple of
        // 4 bytes (bindings are rounded to words); `cmd` is recording.
        unsafe {
            self.ctx
                .device
                .cmd_fill_buffer(st.cmd, b.buf, b.offset, b.range, 0)
        };
        self.ctx.barrier(st);
    }

    /// A new status entry for a check of `arg`; settles the batch first
    /// when the entries run out.
    pub(crate) fn entry(
        &mut self,
        arg: &'static str,
        shape: &[usize],
        kind: CheckKind,
    ) -> Result<u32> {
        if self.st.checks.len() as u32 >= STATUS_ENTRIES {
            let ctx = self.ctx;
            self.stamp_end();
            if let Err(e) = ctx.settle(&mut self.st, self.op) {
                // Keep it for the next settle: the contract reports it later.
                self.st.deferred.get_or_insert(e);
            }
            ctx.begin_cmd(&mut self.st)?;
            self.stamp_start();
        }
        let entry = self.st.checks.len() as u32;
        self.st.checks.push(Check::new(
            self.op,
            arg,
            shape,
            kind,
            entry as usize * ENTRY_WORDS,
        ));
        Ok(entry)
    }

    /// Ends the op (its commands wait in the batch).
    pub(crate) fn finish(self) -> Result<()> {
        Ok(())
    }

    /// Test hook: records (but never submits) a dispatch with a descriptor
    /// set that was never written, which the validation layer must report.
    pub(crate) fn misuse_unwritten_descriptor(&mut self) -> Result<()> {
        let ctx = self.ctx;
        let st = &mut *self.st;
        let pipe = ctx.pipeline(st, "fill", WG, &[], 1)?;
        let set = ctx.descriptor_set(st, pipe.set_layout)?;
        // SAFETY: a separate command buffer that is recorded and freed, never
        // submitted, so the invalid dispatch never executes; only the
        // validation layer sees it.
        unsafe {
            let cb = ctx
                .device
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(ctx.cmd_pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
                .map_err(|e| vk_err("misuse", e))?;
            let Some(&cb) = cb.first() else {
                return Err(dev_err("misuse: no command buffer"));
            };
            ctx.device
                .begin_command_buffer(cb, &vk::CommandBufferBeginInfo::default())
                .map_err(|e| vk_err("misuse", e))?;
            ctx.device
                .cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, pipe.pipeline);
            ctx.device.cmd_bind_descriptor_sets(
                cb,
                vk::PipelineBindPoint::COMPUTE,
                pipe.layout,
                0,
                &[set],
                &[],
            );
            ctx.device.cmd_dispatch(cb, 1, 1, 1);
            let _ = ctx.device.end_command_buffer(cb);
            ctx.device.free_command_buffers(ctx.cmd_pool, &[cb]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod capability_tests {
    use super::*;

    fn cfg(m: u32, n: u32, k: u32, ok: bool) -> CoopmatConfig {
        CoopmatConfig {
            m,
            n,
            k,
            f16_f16_f32: ok,
            subgroup_scope: true,
        }
    }

    #[test]
    fn coopmat_config_is_chosen_by_type_scope_and_k() {
        assert_eq!(pick_coopmat(&[], 32), None);
        // Wrong types, K not dividing 128, wrong scope: none usable.
        let mut wrong_scope = cfg(16, 16, 16, true);
        wrong_scope.subgroup_scope = false;
        assert_eq!(
            pick_coopmat(
                &[cfg(16, 16, 16, false), cfg(16, 16, 24, true), wrong_scope],
                32
            ),
            None
        );
        // The largest tile among the usable ones.
        assert_eq!(
            pick_coopmat(
                &[
                    cfg(16, 8, 16, true),
                    cfg(16, 16, 16, true),
                    cfg(8, 8, 32, true)
                ],
                32
            ),
            Some([16, 16, 16])
        );
    }

    #[test]
    fn used_follows_the_features_and_says_why() {
        let mut f = Features {
            subgroup_size: 8,
            subgroup_arith: true,
            subgroup_compute: true,
            shader_f16: true,
            shader_i8: true,
            storage8: true,
            ..Features::default()
        };
        let u = Used::decide(&f, false);
        assert!(u.subgroup_reductions && u.fp8_storage8 && u.coopmat.is_none());
        assert!(u.coopmat_reason.contains("lacks VK_KHR_cooperative_matrix"));
        f.cooperative_matrix = true;
        assert!(Used::decide(&f, false)
            .coopmat_reason
            .contains("memory model"));
        f.memory_model = true;
        assert!(Used::decide(&f, false)
            .coopmat_reason
            .contains("no subgroup-scope"));
        f.coopmat_configs = vec![cfg(16, 16, 16, true)];
        assert_eq!(Used::decide(&f, false).coopmat, Some([16, 16, 16]));
        let p = Used::decide(&f, true);
        assert!(!p.subgroup_reductions && !p.fp8_storage8 && p.coopmat.is_none());
        f.subgroup_compute = false;
        f.storage8 = false;
        let u = Used::decide(&f, false);
        assert!(!u.subgroup_reductions && !u.fp8_storage8);
    }
}
