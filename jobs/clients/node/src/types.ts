// Types that mirror the job contract: jobs/schema/common.json, vision.annotate.json and
// llm.complete.json (version 1). The schemas are the source of truth; these are a convenience.

/** The subscription tiers, best first (schema/common.json `tier`). */
export const TIERS = [
  "enterprise_plus",
  "enterprise",
  "professional_agency",
  "growth_team",
  "solo_professional",
  "trial",
] as const;

export type Tier = (typeof TIERS)[number];

/** The job kinds aiq runs; one JSON Schema each in jobs/schema/. */
export const JOB_KINDS = ["vision.annotate", "llm.complete"] as const;

export type JobKind = (typeof JOB_KINDS)[number];

/** Fields every job carries (schema/common.json). */
export interface CommonPayload {
  /** Payload version; this contract is version 1. */
  version?: 1;
  /** The organisation billed for the job (UUID). */
  organization_id: string;
  /** The organisation's tier; it is also the tier the job is queued under. */
  tier: Tier;
  /** Informational copy of the key; pass `idempotencyKey` to `add` for it to take effect. */
  idempotency_key?: string;
  /** Your request id; aiq logs it and stores it with the result (at most 200 characters). */
  correlation_id?: string;
  /** What the job is about, e.g. a photo (UUID). */
  subject_id?: string;
  /** What kind of thing subject_id is, e.g. "photo" (at most 50 characters). */
  subject_type?: string;
}

/** An image given inline (base64) or by URI (gs:// or https://). */
export type VisionImage = { content: string } | { uri: string };

export type VisionFeatureType =
  | "LABEL_DETECTION"
  | "TEXT_DETECTION"
  | "DOCUMENT_TEXT_DETECTION"
  | "SAFE_SEARCH_DETECTION"
  | "FACE_DETECTION"
  | "LANDMARK_DETECTION"
  | "LOGO_DETECTION"
  | "IMAGE_PROPERTIES"
  | "CROP_HINTS"
  | "WEB_DETECTION"
  | "OBJECT_LOCALIZATION";

export interface VisionFeature {
  type: VisionFeatureType;
  /** At least 1. */
  maxResults?: number;
}

/** vision.annotate: annotate up to 16 images with Google Cloud Vision. */
export interface VisionAnnotatePayload extends CommonPayload {
  /** 1 to 16 images. */
  images: VisionImage[];
  /** At least one; each feature on each image is one billable unit. */
  features: VisionFeature[];
}

export type LlmProvider = "openai" | "anthropic" | "gemini";

export interface LlmMessage {
  role: "system" | "developer" | "user" | "assistant";
  content: string;
}

/** llm.complete: one chat completion from an LLM provider. */
export interface LlmCompletePayload extends CommonPayload {
  provider: LlmProvider;
  /** Must be in aiq's price catalog for the provider; unpriced models are refused. */
  model: string;
  /** At least one message. */
  messages: LlmMessage[];
  /** 1 to 200000. */
  max_tokens: number;
}

/** The payload type of each job kind. */
export interface PayloadByKind {
  "vision.annotate": VisionAnnotatePayload;
  "llm.complete": LlmCompletePayload;
}
